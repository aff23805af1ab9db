"""Triton model `kv_transfer`: the KV directory; see src/triton_disagg/serving/kv_directory.py."""

from triton_disagg.serving.kv_directory import DirectoryService


class TritonPythonModel:
    def initialize(self, args):
        self._service = DirectoryService()

    def execute(self, requests):
        return [self._service.execute(request) for request in requests]
