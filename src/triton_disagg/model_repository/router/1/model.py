"""Triton model `router`: KV-aware worker choice; see src/triton_disagg/serving/router_service.py."""

import faulthandler
import json
import os

from triton_disagg.serving.live_workers import MODEL_CONTROL_KEY_ENV, model_control_headers
from triton_disagg.serving.router_service import RouterService
from triton_disagg.serving.settings import model_parameters
from triton_disagg.router.config import RouterConfig
from triton_disagg.serving.triton_io import finalize_service


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub leaves every thread's stack in the server log
        parameters = model_parameters(json.loads(args["model_config"]))
        host = parameters.get("server_host") or "localhost"
        self._service = RouterService(
            RouterConfig.from_mapping(parameters),
            http_url=f"http://{host}:{parameters.get('http_port') or 8000}",
            kv_events_dir=parameters.get("kv_events_dir", ""),
            metrics_url=f"http://{host}:{parameters['metrics_port']}/metrics" if parameters.get("metrics_port") else "",
            # Inherited from the server's environment (see src/triton_disagg/launch/server.py), never a parameter.
            repository_headers=model_control_headers(os.environ.get(MODEL_CONTROL_KEY_ENV)),
        )

    def execute(self, requests):
        return [self._service.execute(request) for request in requests]

    def finalize(self):
        finalize_service(self)
