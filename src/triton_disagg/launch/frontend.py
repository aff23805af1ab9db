"""Run the OpenAI frontend as a child process next to a Triton server."""

from __future__ import annotations

import os
from pathlib import Path

from triton_disagg.frontend.config import DEFAULT_MAX_BODY_BYTES, FrontendConfig
from triton_disagg.launch.service_process import ServiceProcess

#: API keys reach the child through the environment, not its command line (which `ps` shows).
API_KEYS_ENV = "TRITON_DISAGG_API_KEYS"


class FrontendProcess(ServiceProcess):
    """`triton-disagg frontend` in a child process; a context manager like TritonServer."""

    what = "the frontend"

    def __init__(self, config: FrontendConfig, log_path: Path) -> None:
        config.validate()
        super().__init__(log_path)
        self.config = config

    @property
    def url(self) -> str:
        host = "localhost" if self.config.host in ("0.0.0.0", "::") else self.config.host
        return f"http://{host}:{self.config.port}"

    @property
    def ready_url(self) -> str:
        return f"{self.url}/health"

    def start(self) -> None:
        config = self.config
        command = [
            "frontend",
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
        if config.more_models:
            command += ["--more-models", ",".join(f"{name}={url}" for name, url in config.more_models)]
        env = dict(os.environ)
        env.pop(API_KEYS_ENV, None)
        if config.api_keys:
            env[API_KEYS_ENV] = ",".join(config.api_keys)
        self._spawn(command, env)


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
    flag(
        "--more-models",
        metavar="NAME=HOST:PORT[,...]",
        default="",
        help="more models to serve side by side: for each, the name clients send as `model` and the gRPC endpoint "
        "of the Triton server running its llm; requests are routed by `model`",
    )


def frontend_config(args, triton_url: str, **overrides) -> FrontendConfig:
    """The FrontendConfig that add_frontend_flags' flags describe."""
    return FrontendConfig(
        triton_url=triton_url,
        host=args.frontend_host,
        port=args.frontend_port,
        api_keys=tuple(key.strip() for key in args.api_keys.split(",") if key.strip()),
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        more_models=FrontendConfig.parse_model_routes(args.more_models),
        **overrides,
    )
