"""Triton model `llm`: the entry model (text in, text out); see src/triton_disagg/serving/llm.py."""

import faulthandler
import json

import triton_python_backend_utils as pb_utils

from triton_disagg.serving.llm import LLMService
from triton_disagg.serving.settings import llm_settings, model_parameters
from triton_disagg.serving.triton_io import finalize_service


class TritonPythonModel:
    def initialize(self, args):
        faulthandler.enable(all_threads=True)  # a crash of this stub leaves every thread's stack in the server log
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the llm model streams its output: set decoupled: true")
        self._service = LLMService(llm_settings(model_parameters(model_config)))

    def execute(self, requests):
        for request in requests:
            self._service.submit(request)
        return None

    def finalize(self):
        finalize_service(self)
