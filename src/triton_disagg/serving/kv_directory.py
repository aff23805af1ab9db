"""The `kv_transfer` model (the KV directory) and the BLS client workers use to reach it."""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_disagg.kv_transfer.directory import KVDirectory
from triton_disagg.kv_transfer.layout import PoolLayout
from triton_disagg.serving.triton_io import (
    bytes_tensor,
    error_response,
    read_inputs,
    read_output,
)

logger = logging.getLogger(__name__)

DIRECTORY_MODEL = "kv_transfer"
DIRECTORY_INPUT_NAMES = ("action", "agent_name", "layout", "metadata")
ACTIONS = ("register", "unregister", "lookup")


def _uint8_tensor(name: str, data: bytes) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.frombuffer(data, dtype=np.uint8).copy())


class DirectoryService:
    """Answers register / unregister / lookup; one response per request."""

    def __init__(self) -> None:
        self.directory = KVDirectory()

    def execute(self, request) -> "pb_utils.InferenceResponse":
        try:
            inputs = read_inputs(request, DIRECTORY_INPUT_NAMES)
            action = bytes(inputs["action"].reshape(-1)[0]).decode()
            if action == "register":
                layout = PoolLayout.decode(inputs["layout"].tobytes())
                self.directory.register(layout, inputs["metadata"].tobytes())
                logger.info("KV directory: registered %s (%d blocks)", layout.agent_name, layout.num_blocks)
                return self._reply(found=True)
            agent_name = bytes(inputs["agent_name"].reshape(-1)[0]).decode()
            if action == "unregister":
                return self._reply(found=self.directory.unregister(agent_name))
            if action == "lookup":
                entry = self.directory.lookup(agent_name)
                if entry is None:
                    return self._reply(found=False)
                return self._reply(True, entry.layout.encode(), entry.metadata)
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        except Exception as exc:  # noqa: BLE001 - a bad request gets an error, the directory keeps serving
            return error_response(exc)

    @staticmethod
    def _reply(found: bool, layout: bytes = b"", metadata: bytes = b"") -> "pb_utils.InferenceResponse":
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("found", np.array([found], dtype=np.bool_)),
                _uint8_tensor("layout", layout),
                _uint8_tensor("metadata", metadata),
            ]
        )


class DirectoryClient:
    """Calls the `kv_transfer` model through BLS from a worker model."""

    def register(self, layout: PoolLayout, metadata: bytes) -> None:
        self._call("register", layout.agent_name, layout.encode(), metadata)

    def lookup(self, agent_name: str) -> tuple[PoolLayout, bytes] | None:
        response = self._call("lookup", agent_name)
        if not bool(read_output(response, "found").reshape(-1)[0]):
            return None
        return PoolLayout.decode(read_output(response, "layout").tobytes()), read_output(response, "metadata").tobytes()

    @staticmethod
    def _call(action: str, agent_name: str, layout: bytes = b"", metadata: bytes = b""):
        inputs = [bytes_tensor("action", action), bytes_tensor("agent_name", agent_name)]
        if layout:
            inputs += [_uint8_tensor("layout", layout), _uint8_tensor("metadata", metadata)]
        response = pb_utils.InferenceRequest(
            model_name=DIRECTORY_MODEL, inputs=inputs, requested_output_names=["found", "layout", "metadata"]
        ).exec()
        if response.has_error():
            raise RuntimeError(response.error().message())
        return response
