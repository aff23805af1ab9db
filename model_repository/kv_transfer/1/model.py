"""Triton model `kv_transfer`: the KV directory; see python_backends/serving/kv_directory.py."""

from python_backends.serving.kv_directory import DirectoryService


class TritonPythonModel:
    def initialize(self, args):
        self._service = DirectoryService()

    def execute(self, requests):
        return [self._service.execute(request) for request in requests]
