"""The `decode_<j>` models: decode with continuous batching, prefilling locally or on a prefill worker.

A request offers a prefill worker (`prefill_worker`); the decode worker
decides (see `disagg.decide_prefill`) from its own prefix-cache hit and the
prompt. For a remote prefill it calls the prefill worker (in its own server,
or at `prefill_worker_url` in another), streams the first token at once,
then pulls the KV over NIXL and decodes.
If the prefill worker fails or is gone, the prompt is prefilled locally.
With no prefill worker at all, a decode worker is an aggregated worker.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid

import triton_python_backend_utils as pb_utils

from triton_disagg.engine.kv_connector import RemoteKV
from triton_disagg.engine.params import InvalidRequest
from triton_disagg.kv_transfer.handle import InvalidKVHandle, KVHandle
from triton_disagg.serving.watched_stream import watched_stream
from triton_disagg.serving.disagg import decide_prefill
from triton_disagg.serving.migration import lost_worker_reason
from triton_disagg.serving.protocol import (
    DECODE_INPUT_NAMES,
    DecodeGenerate,
    ExpertLoadRequest,
    WorkerAbort,
    WorkerDescribe,
    parse_decode_request,
)
from triton_disagg.serving.model_calls import ModelCalls, ModelResponse, calls_to, text_array
from triton_disagg.serving.triton_io import (
    bytes_tensor,
    error_response,
    int32_tensor,
    prompt_arrays,
    read_inputs,
)
from triton_disagg.serving.worker import FINAL, EngineService, ResponseStream
from triton_disagg.router.hashing import hash_request_tokens

logger = logging.getLogger(__name__)

#: Seconds without an answer from a prefill worker after which it is probed; a dead one means a local prefill.
PREFILL_PROBE_AFTER_S = 2.0


@dataclasses.dataclass(slots=True, frozen=True)
class _PrefillResult:
    first_token_id: int
    finish_reason: str | None
    kv_handle: bytes
    num_cached_tokens: int


class DecodeService(EngineService):
    """`min_remote_tokens`: the shortest uncached prompt part worth a remote prefill."""

    def __init__(self, *args, min_remote_tokens: int = 512, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_remote_tokens = min_remote_tokens
        self._prefilling: set[str] = set()  # requests waiting on a prefill worker
        self._cancelled: set[str] = set()  # ... whose abort arrived meanwhile
        self._lock = threading.Lock()

    def submit(self, request) -> None:
        self.ensure_registered()
        sender = request.get_response_sender()
        try:
            parsed = parse_decode_request(read_inputs(request, DECODE_INPUT_NAMES))
            if isinstance(parsed, WorkerAbort):
                self.abort(parsed.request_id)
                sender.send(flags=FINAL)
                return
            if isinstance(parsed, ExpertLoadRequest):
                self.send_expert_load(sender)
                return
            if isinstance(parsed, WorkerDescribe):
                self.send_info(sender)
                return
            request_id = request.request_id() or uuid.uuid4().hex
            stream = ResponseStream(self, sender, request_id)
            if parsed.kv_handle is not None:
                remote = self._remote_kv_from_client(parsed)
                self.metrics.count_decision("client_handle")
                self._submit(request_id, parsed, stream, remote)
                return
            decision = decide_prefill(
                num_prompt_tokens=len(parsed.prompt_token_ids),
                num_local_hit_tokens=self._local_hit_tokens(parsed.prompt_token_ids),
                min_remote_tokens=self.min_remote_tokens,
                max_tokens=parsed.params.max_tokens,
                prefill_worker=parsed.prefill_worker,
                prefill_pool_saturated=parsed.prefill_pool_saturated,
            )
            self.metrics.count_decision(decision.reason)
            if not decision.remote:
                self._submit(request_id, parsed, stream)
                return
            self.engine.validate_request(parsed.prompt_token_ids, parsed.params)
            with self._lock:
                self._prefilling.add(request_id)
            threading.Thread(
                target=self._prefill_remotely, args=(request_id, parsed, sender, stream), daemon=True
            ).start()
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller as an error response
            sender.send(error_response(exc), flags=FINAL)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._prefilling:
                self._cancelled.add(request_id)
        super().abort(request_id)

    # -- remote prefill ------------------------------------------------------------------

    def _prefill_remotely(self, request_id: str, parsed: DecodeGenerate, sender, stream: ResponseStream) -> None:
        try:
            try:
                result = self._call_prefill(parsed)
            except Exception as exc:  # noqa: BLE001 - the prefill worker failed or is gone: prefill here
                logger.warning("prefill on %s failed (%s); prefilling %s locally", parsed.prefill_worker, exc, request_id)
                self.metrics.count_decision("local_prefill_failed")
                self._submit(request_id, parsed, stream)
                return
            tensors = [
                int32_tensor("output_ids", [result.first_token_id]),
                int32_tensor("num_input_tokens", len(parsed.prompt_token_ids)),
                int32_tensor("num_cached_tokens", result.num_cached_tokens),
            ]
            if not result.kv_handle:  # the first token ended the request (EOS, stop token)
                tensors.append(bytes_tensor("finish_reason", result.finish_reason or "stop"))
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL)
                return
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
            handle = KVHandle.decode(result.kv_handle)
            self._ensure_peer(handle.agent_name)
            remote = RemoteKV(handle, result.first_token_id)
            self._submit(request_id, parsed, stream, remote)
        except Exception as exc:  # noqa: BLE001 - the caller gets the error
            logger.exception("remote prefill of %s failed", request_id)
            sender.send(error_response(exc), flags=FINAL)
        finally:
            with self._lock:
                self._prefilling.discard(request_id)
                cancelled = request_id in self._cancelled
                self._cancelled.discard(request_id)
            if cancelled:  # aborted while prefilling: abort now that the engine knows it (frees both sides)
                super().abort(request_id)

    def _call_prefill(self, parsed: DecodeGenerate) -> _PrefillResult:
        """The prefill worker's first token and KV handle. Raises when it fails, dies or is gone."""
        worker = parsed.prefill_worker
        calls = self._calls_to(parsed.prefill_worker_url)

        def start():
            inputs = prompt_arrays(parsed.prompt_token_ids, parsed.params, with_max_tokens=False)
            outputs = ["output_ids", "finish_reason", "num_cached_tokens", "kv_handle"]
            return calls.stream(worker, inputs, outputs, uuid.uuid4().hex)

        probe = lambda: _probe_prefill(calls, worker)  # noqa: E731
        results = watched_stream(worker, start, _prefill_result_of, probe, PREFILL_PROBE_AFTER_S)
        result = None
        for item in results:
            if isinstance(item, str):
                raise RuntimeError(item)
            result = item or result
        if result is None:
            raise RuntimeError(f"{worker} returned no first token")
        return result

    # -- helpers ---------------------------------------------------------------------------

    def _submit(self, request_id: str, parsed: DecodeGenerate, stream: ResponseStream, remote: RemoteKV | None = None) -> None:
        self.engine_thread.submit(
            request_id, parsed.prompt_token_ids, parsed.params, stream.on_output, stream.on_error, remote_kv=remote
        )

    def _local_hit_tokens(self, prompt_token_ids: list[int]) -> int:
        """Leading prompt tokens this worker holds in any tier (device, then host memory and disk).

        Reads the engine thread's maps without a lock: a heuristic may see a
        slightly stale answer, and the engine re-checks when it allocates.
        """
        hashes = hash_request_tokens(prompt_token_ids, self.engine.block_size)
        num_hits = len(self.engine.block_manager.cached_block_ids(hashes))
        tiers = self.engine.tiers
        while tiers is not None and num_hits < len(hashes) and tiers.find(hashes[num_hits]) is not None:
            num_hits += 1
        return num_hits * self.engine.block_size

    def _ensure_peer(self, agent_name: str) -> None:
        connector = self.engine.kv_connector
        if connector.knows_peer(agent_name):
            return
        entry = self.directory.lookup(agent_name)
        if entry is not None:  # if not, the pull fails to start and the prompt is prefilled here
            connector.add_peer_threadsafe(*entry)

    def _remote_kv_from_client(self, parsed: DecodeGenerate) -> RemoteKV:
        """A handle sent by a client: check it names a live hold for exactly this prompt."""
        handle = KVHandle.decode(parsed.kv_handle)
        expected = hash_request_tokens(parsed.prompt_token_ids, handle.block_size)
        if list(handle.block_hashes) != expected:
            raise InvalidKVHandle("kv_handle does not hold this prompt's KV (its block hashes differ)")
        entry = self.directory.lookup(handle.agent_name)
        if entry is None:
            raise InvalidKVHandle(f"kv_handle names agent {handle.agent_name!r}, which is not in the KV directory")
        layout, metadata = entry
        if not self._hold_is_live(self._calls_to(layout.server_url), layout.model_name, handle.hold_id):
            raise InvalidKVHandle(f"kv_handle is stale: {layout.model_name} no longer holds {handle.hold_id!r}")
        if not self.engine.kv_connector.knows_peer(handle.agent_name):
            self.engine.kv_connector.add_peer_threadsafe(layout, metadata)
        if parsed.params.max_tokens < 2:
            raise InvalidRequest("max_tokens must be >= 2 with a kv_handle: the first token is already sampled")
        return RemoteKV(handle, parsed.first_token_id)

    def _calls_to(self, server_url: str) -> ModelCalls:
        """How to reach a model of the server at gRPC `server_url`; "" is the entry server (the one running the
        router and the KV directory: this one, or the one at `directory_url`)."""
        server_url = server_url or self.network.directory_url
        return calls_to(server_url) if server_url and server_url != self.network.grpc_url else self.calls

    @staticmethod
    def _hold_is_live(calls: ModelCalls, model_name: str, hold_id: str) -> bool:
        inputs = {"check_hold_id": text_array(hold_id)}
        for response in calls.stream(model_name, inputs, ["hold_found"]):
            if response.has_error:
                return False
            found = response.output("hold_found")
            if found is not None:
                return bool(found.reshape(-1)[0])
        return False


def _prefill_result_of(response: ModelResponse) -> "_PrefillResult | str | None":
    """A prefill worker's response as plain data: its result, its error message, or None (no token)."""
    if response.has_error:
        return response.error_message
    token_ids = response.output("output_ids")
    if token_ids is None or not token_ids.size:
        return None
    reason = response.output("finish_reason")
    return _PrefillResult(
        first_token_id=int(token_ids.reshape(-1)[0]),
        finish_reason=None if reason is None else reason.reshape(-1)[0].decode(),
        kv_handle=response.output("kv_handle").tobytes(),
        num_cached_tokens=int(response.output("num_cached_tokens").reshape(-1)[0]),
    )


def _probe_prefill(calls: ModelCalls, worker: str) -> str | None:
    """None while the prefill worker answers a hold check; else why not ("dead" or "gone")."""
    inputs = {"check_hold_id": text_array("liveness-probe")}
    try:
        for response in calls.stream(worker, inputs, ["hold_found"]):
            if response.has_error:
                return lost_worker_reason(response.error_message) or "gone"
    except Exception as exc:  # noqa: BLE001 - a failed BLS call is an answer too
        return lost_worker_reason(str(exc)) or "gone"
    return None
