"""Run `triton-disagg plan` as a child process next to a Triton server (`serve --deployment` with a planner)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from triton_disagg.launch.server import ChildProcess, ServerError
from triton_disagg.serving.live_workers import MODEL_CONTROL_KEY_HEADER


class PlannerProcess(ChildProcess):
    """`triton-disagg plan ARGS` in a child process; ready once its metrics page answers.

    A model-control key reaches it through the environment (TRITON_DISAGG_API_KEY_HEADER), not its command line.
    """

    def __init__(self, args: Sequence[str], log_path: Path, model_control_key: str | None = None) -> None:
        self.args = list(args)
        self.log_path = Path(log_path)
        self._model_control_key = model_control_key
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def metrics_url(self) -> str:
        """The planner's metrics page (its arguments name the port: --planner-port)."""
        return f"http://localhost:{self.args[self.args.index('--planner-port') + 1]}/metrics"

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("TRITON_DISAGG_API_KEY_HEADER", None)
        if self._model_control_key is not None:
            env["TRITON_DISAGG_API_KEY_HEADER"] = f"{MODEL_CONTROL_KEY_HEADER}={self._model_control_key}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "triton_disagg.cli.main", *self.args],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the metrics page answers 200. Raises ServerError if the planner exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServerError(f"the planner exited with code {self._process.returncode}; {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(self.metrics_url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the planner was not ready after {timeout_s:.0f} s; {self.log_path}:\n{self.log_tail()}")
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
