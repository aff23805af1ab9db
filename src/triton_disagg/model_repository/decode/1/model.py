"""Triton model `decode_<j>`: one decode engine per instance; see src/triton_disagg/serving/decode.py."""

import faulthandler
import json

import triton_python_backend_utils as pb_utils

from triton_disagg.serving.decode import DecodeService
from triton_disagg.serving.settings import engine_config, min_remote_prefill_tokens, model_parameters, worker_network
from triton_disagg.serving.triton_io import finalize_service


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub leaves every thread's stack in the server log
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the decode model streams its tokens: set decoupled: true")
        parameters = model_parameters(model_config)
        self._service = DecodeService(
            engine_config(parameters), args["model_name"], worker_network(parameters), min_remote_tokens=min_remote_prefill_tokens(parameters)
        )

    def execute(self, requests):
        for request in requests:
            self._service.submit(request)
        return None

    def finalize(self):
        finalize_service(self)
