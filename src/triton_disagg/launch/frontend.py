"""Run the OpenAI frontend as a child process next to a Triton server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from triton_disagg.frontend.config import DEFAULT_MAX_BODY_BYTES, FrontendConfig
from triton_disagg.launch.server import ChildProcess, ServerError

#: API keys reach the child through the environment, not its command line (which `ps` shows).
API_KEYS_ENV = "TRITON_DISAGG_API_KEYS"


class FrontendProcess(ChildProcess):
    """`triton-disagg frontend` in a child process; a context manager like TritonServer."""

    def __init__(self, config: FrontendConfig, log_path: Path) -> None:
        config.validate()
        self.config = config
        self.log_path = Path(log_path)
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def url(self) -> str:
        host = "localhost" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}"

    def start(self) -> None:
        config = self.config
        command = [
            sys.executable, "-m", "triton_disagg.cli.main", "frontend",
            "--triton-url", config.triton_url,
            "--frontend-host", config.host,
            "--frontend-port", str(config.port),
            "--max-body-bytes", str(config.max_body_bytes),
        ]  # fmt: skip
        if config.served_model_name:
            command += ["--served-model-name", config.served_model_name]
        if config.model_path:
            command += ["--model-path", str(config.model_path)]
        if config.max_model_len:
            command += ["--max-model-len", str(config.max_model_len)]
        env = dict(os.environ)
        env.pop(API_KEYS_ENV, None)
        if config.api_keys:
            env[API_KEYS_ENV] = ",".join(config.api_keys)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "wb")
        self._process = subprocess.Popen(
            command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until GET /health answers 200. Raises ServerError if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise ServerError(f"the frontend exited with code {self._process.returncode}; {self.log_path}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the frontend was not ready after {timeout_s:.0f} s; {self.log_path}:\n{self.log_tail()}")
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


def add_frontend_flags(flag, *, port_help: str = "port of the OpenAI API") -> None:
    """Flags of the frontend shared by `frontend` and `serve` (flag: launch.flags.EnvFlags of the subcommand)."""
    flag("--frontend-host", default="0.0.0.0", help="address the OpenAI API listens on")
    flag("--frontend-port", type=int, default=8080, help=port_help)
    flag(
        "--api-keys",
        metavar="KEY[,KEY...]",
        default="",
        help="comma-separated keys accepted as `Authorization: Bearer <key>` on /v1/* (default: no keys, no auth); "
        "keys on the command line show in `ps`, prefer the environment variable",
    )
    flag("--served-model-name", default=None, help="the model name clients send (default: the checkpoint directory's name)")
    flag("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body; larger gets 413")


def frontend_config(args, triton_url: str, **overrides) -> FrontendConfig:
    """The FrontendConfig that add_frontend_flags' flags describe."""
    return FrontendConfig(
        triton_url=triton_url,
        host=args.frontend_host,
        port=args.frontend_port,
        api_keys=tuple(key.strip() for key in args.api_keys.split(",") if key.strip()),
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        **overrides,
    )
