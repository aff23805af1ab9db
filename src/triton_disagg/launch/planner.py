"""Run `triton-disagg plan` as a child process next to a Triton server (`serve --deployment` with a planner)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from triton_disagg.launch.service_process import ServiceProcess
from triton_disagg.serving.live_workers import MODEL_CONTROL_KEY_HEADER

#: The environment variable of `plan --api-key-header`: a key stays off the planner's command line.
API_KEY_HEADER_ENV = "TRITON_DISAGG_API_KEY_HEADER"


class PlannerProcess(ServiceProcess):
    """`triton-disagg plan ARGS` in a child process; ready once its metrics page answers.

    ARGS must name the metrics port (--planner-port). A model-control key reaches the
    planner through the environment, not its command line.
    """

    what = "the planner"

    def __init__(self, args: Sequence[str], log_path: Path, model_control_key: str | None = None) -> None:
        super().__init__(log_path)
        self.args = list(args)
        self._model_control_key = model_control_key

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.args[self.args.index('--planner-port') + 1]}/metrics"

    @property
    def ready_url(self) -> str:
        return self.metrics_url

    def start(self) -> None:
        env = dict(os.environ)
        env.pop(API_KEY_HEADER_ENV, None)
        if self._model_control_key is not None:
            env[API_KEY_HEADER_ENV] = f"{MODEL_CONTROL_KEY_HEADER}={self._model_control_key}"
        self._spawn(self.args, env)
