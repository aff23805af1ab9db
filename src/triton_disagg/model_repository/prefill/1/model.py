"""Triton model `prefill_<k>`: one prefill engine per instance; see src/triton_disagg/serving/prefill.py."""

import faulthandler
import json

import triton_python_backend_utils as pb_utils

from triton_disagg.serving.prefill import PrefillService
from triton_disagg.serving.settings import engine_config, model_parameters, worker_network
from triton_disagg.serving.triton_io import finalize_service


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub leaves every thread's stack in the server log
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the prefill model must be decoupled: set decoupled: true")
        parameters = model_parameters(model_config)
        self._service = PrefillService(
            engine_config(parameters), args["model_name"], worker_network(parameters)
        )

    def execute(self, requests):
        for request in requests:
            self._service.submit(request)
        return None

    def finalize(self):
        finalize_service(self)
