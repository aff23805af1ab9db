"""The `kv_transfer` model (the KV directory) and the client workers use to reach it.

The directory runs in the entry server; workers of other servers register
with their server's gRPC endpoint in their layout. The model follows the
repository index of its own server and of every server an entry came from
(as the router does), and drops the entries of workers that were unloaded
there, or whose server stopped answering; `llm` drops those of a decode
worker it found dead (`forget_model`).
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
import tritonclient.grpc as grpcclient

from triton_disagg.errors import InvalidRequest
from triton_disagg.kv_transfer.directory import KVDirectory
from triton_disagg.kv_transfer.layout import PoolLayout
from triton_disagg.serving.live_workers import RepositoryWatcher
from triton_disagg.serving.model_calls import ModelCalls, ModelResponse, text_array
from triton_disagg.serving.triton_io import (
    bytes_tensor,
    error_response,
    read_inputs,
)

logger = logging.getLogger(__name__)

DIRECTORY_MODEL = "kv_transfer"
DIRECTORY_INPUT_NAMES = ("action", "agent_name", "layout", "metadata")
ACTIONS = ("register", "unregister", "lookup", "forget_model", "list")
OUTPUT_NAMES = ("found", "layout", "metadata", "agent_names")


def _uint8_tensor(name: str, data: bytes) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.frombuffer(data, dtype=np.uint8).copy())


#: Failed polls of another server's repository index after which its entries are dropped.
MAX_FAILED_REMOTE_POLLS = 3


class DirectoryService:
    """Answers register / unregister / lookup / forget_model / list; one response per request.

    With `http_url`, it polls that server's repository index, and the index of every server remote
    entries came from (gRPC), every `interval_s`, and drops the entries of models no longer READY
    there (`repository_headers`: the key of a restricted repository API).
    """

    def __init__(
        self, http_url: str | None = None, repository_headers: dict[str, str] | None = None, interval_s: float = 1.0
    ) -> None:
        self.directory = KVDirectory()
        self._watcher = None
        self._headers = repository_headers or {}
        self._stop = threading.Event()
        self._failed_polls: dict[str, int] = {}
        self._interval_s = interval_s
        self._remote_watcher: threading.Thread | None = None
        if http_url:
            self._watcher = RepositoryWatcher(http_url, self._on_live, headers=repository_headers, interval_s=interval_s)
            self._watcher.start()

    def _watch_remote_servers(self) -> None:
        """From the first entry of another server on: poll the servers entries came from (one thread)."""
        if self._watcher is not None and self._remote_watcher is None:
            self._remote_watcher = threading.Thread(target=self._watch_remote, name="kv-directory-remote", daemon=True)
            self._remote_watcher.start()

    def shutdown(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.stop()

    def _on_live(self, model_names: list[str]) -> None:
        for agent_name in self.directory.retain_models(set(model_names), server_url=""):
            logger.info("KV directory: dropped %s (its worker was unloaded)", agent_name)

    def _watch_remote(self) -> None:
        # gRPC clients send a restricted API's header with Triton's prefix.
        headers = {f"triton-grpc-protocol-{name}": value for name, value in self._headers.items()}
        clients: dict[str, grpcclient.InferenceServerClient] = {}
        while not self._stop.wait(self._interval_s):
            for url in self.directory.server_urls():
                try:
                    client = clients.get(url) or clients.setdefault(url, grpcclient.InferenceServerClient(url))
                    index = client.get_model_repository_index(headers=headers, as_json=True, client_timeout=5.0)
                except Exception as exc:  # noqa: BLE001 - counted; the server may come back
                    self._failed_polls[url] = self._failed_polls.get(url, 0) + 1
                    if self._failed_polls[url] >= MAX_FAILED_REMOTE_POLLS:
                        for agent_name in self.directory.retain_models(set(), server_url=url):
                            logger.info("KV directory: dropped %s (its server %s stopped answering: %s)", agent_name, url, exc)
                    continue
                self._failed_polls.pop(url, None)
                live = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
                for agent_name in self.directory.retain_models(live, server_url=url):
                    logger.info("KV directory: dropped %s (its worker was unloaded from %s)", agent_name, url)

    def execute(self, request) -> "pb_utils.InferenceResponse":
        try:
            inputs = read_inputs(request, DIRECTORY_INPUT_NAMES)
            action = bytes(inputs["action"].reshape(-1)[0]).decode()
            if action == "register":
                layout = PoolLayout.decode(inputs["layout"].tobytes())
                self.directory.register(layout, inputs["metadata"].tobytes())
                if layout.server_url:
                    self._watch_remote_servers()
                where = layout.server_url or "this server"
                logger.info("KV directory: registered %s (%d blocks) on %s", layout.agent_name, layout.num_blocks, where)
                return self._reply(found=True)
            if action == "list":
                return self._reply(found=True, agent_names=self.directory.agent_names())
            if inputs["agent_name"] is None:
                raise InvalidRequest(f"action {action} needs agent_name")
            agent_name = bytes(inputs["agent_name"].reshape(-1)[0]).decode()
            if action == "forget_model":  # agent_name carries the model name here
                dropped = self.directory.forget_model(agent_name)
                logger.info("KV directory: dropped %s (model %s found dead)", dropped, agent_name)
                return self._reply(found=bool(dropped), agent_names=dropped)
            if action == "unregister":
                return self._reply(found=self.directory.unregister(agent_name))
            if action == "lookup":
                entry = self.directory.lookup(agent_name)
                if entry is None:
                    return self._reply(found=False)
                return self._reply(True, entry.layout.encode(), entry.metadata)
            raise InvalidRequest(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
        except Exception as exc:  # noqa: BLE001 - a bad request gets an error, the directory keeps serving
            return error_response(exc)

    @staticmethod
    def _reply(
        found: bool, layout: bytes = b"", metadata: bytes = b"", agent_names: list[str] | None = None
    ) -> "pb_utils.InferenceResponse":
        names = np.array([n.encode() for n in agent_names or []], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("found", np.array([found], dtype=np.bool_)),
                _uint8_tensor("layout", layout),
                _uint8_tensor("metadata", metadata),
                pb_utils.Tensor("agent_names", names),
            ]
        )


class DirectoryClient:
    """Calls the `kv_transfer` model from a worker model or `llm`."""

    def __init__(self, calls: ModelCalls) -> None:
        self._calls = calls

    def register(self, layout: PoolLayout, metadata: bytes) -> None:
        self._call("register", layout.agent_name, layout.encode(), metadata)

    def forget_model(self, model_name: str) -> None:
        self._call("forget_model", model_name)

    def lookup(self, agent_name: str) -> tuple[PoolLayout, bytes] | None:
        response = self._call("lookup", agent_name)
        if not bool(response.output("found").reshape(-1)[0]):
            return None
        return PoolLayout.decode(response.output("layout").tobytes()), response.output("metadata").tobytes()

    def _call(self, action: str, agent_name: str, layout: bytes = b"", metadata: bytes = b"") -> ModelResponse:
        inputs = {"action": text_array(action), "agent_name": text_array(agent_name)}
        if layout:
            inputs |= {"layout": np.frombuffer(layout, dtype=np.uint8), "metadata": np.frombuffer(metadata, dtype=np.uint8)}
        response = self._calls.call(DIRECTORY_MODEL, inputs, list(OUTPUT_NAMES))
        if response.has_error:
            raise RuntimeError(response.error_message)
        return response

