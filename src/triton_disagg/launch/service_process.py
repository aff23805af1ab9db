"""A child process of this package's CLI (the frontend, the planner), ready once one of its URLs answers 200."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from triton_disagg.launch.server import ChildProcess, ServerError


class ServiceProcess(ChildProcess):
    """`python -m triton_disagg.cli.main ARGS` in its own session, logging to `log_path`.

    Subclasses set `what` ("the frontend") and `ready_url`, and start with `_spawn`.
    """

    what: str
    ready_url: str

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self._process: subprocess.Popen | None = None
        self._log_file = None

    def _spawn(self, cli_args: list[str], env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "triton_disagg.cli.main", *cli_args],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until `ready_url` answers 200. Raises ServerError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServerError(f"{self.what} exited with code {self._process.returncode}; {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(self.ready_url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"{self.what} was not ready after {timeout_s:.0f} s; {self.log_path}:\n{self.log_tail()}")
            time.sleep(0.2)

    def poll(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
