"""Triton model `worker`: one engine per instance; see python_backends/serving/worker.py."""

import json

import triton_python_backend_utils as pb_utils

from python_backends.serving.settings import engine_config, model_parameters
from python_backends.serving.worker import WorkerService


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the worker model streams its tokens: set decoupled: true")
        labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self._service = WorkerService(engine_config(model_parameters(model_config)), labels)

    def execute(self, requests):
        for request in requests:
            self._service.submit(request)
        return None

    def finalize(self):
        self._service.shutdown()
