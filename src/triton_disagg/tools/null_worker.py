"""A decode worker with no engine: each step gives every request it streams one token.

Loaded in place of `decode_<j>` (its `model.py` imports `TritonPythonModel`
from here), it speaks the decode worker's protocol, so the `llm` relay and
the router work unchanged in front of it. What it streams directly is the
ceiling a relay in front of it is measured against. Two ways to send, by
the model parameter `null_step_ms`:

- empty (per token): one thread sends every running request its next token,
  one response per token, step after step as fast as the sends go;
- a number: a step every `null_step_ms` (an engine that fast), its tokens
  sent the way engine workers send them, through a `CoalescingSender` that
  merges a request's tokens while the sender is behind.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils

from triton_disagg.router.config import PublisherConfig
from triton_disagg.router.events import WorkerId
from triton_disagg.router.publisher import KVEventPublisher
from triton_disagg.serving.coalescing_sender import CoalescingSender
from triton_disagg.serving.live_workers import kv_event_endpoints
from triton_disagg.serving.protocol import DECODE_INPUT_NAMES, WorkerAbort, parse_decode_request
from triton_disagg.serving.settings import model_parameters
from triton_disagg.serving.triton_io import bytes_tensor, error_response, int32_tensor, read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
#: The tokens streamed, in turn: the bytes "a".."z" of the default model's byte-level vocabulary.
TOKEN_IDS = tuple(range(ord("a"), ord("z") + 1))


@dataclass(slots=True, eq=False)  # hashed by identity: a sender's stream key
class _Stream:
    sender: object
    num_prompt_tokens: int
    max_tokens: int
    num_sent: int = 0
    is_aborted: bool = False


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("the null worker streams: set decoupled: true")
        parameters = model_parameters(model_config)
        step_ms = parameters.get("null_step_ms", "").strip()
        # It caches nothing, but publishes like a worker (heartbeats, empty dumps): the router routes
        # only to workers whose KV event stream answers.
        self._publisher = None
        if kv_events_dir := parameters.get("kv_events_dir", "").strip():
            events_endpoint, dump_endpoint = kv_event_endpoints(kv_events_dir, args["model_name"])
            self._publisher = KVEventPublisher(WorkerId(args["model_name"]), PublisherConfig(events_endpoint, dump_endpoint))
        self._step_s = float(step_ms) / 1e3 if step_ms else None
        self._responses = None
        if self._step_s is not None:
            self._responses = CoalescingSender("null-responses", _send_tokens, _merge_tokens, lambda key, exc: None)
        self._streams: dict[str, _Stream] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="null-worker", daemon=True)
        self._thread.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_decode_request(read_inputs(request, DECODE_INPUT_NAMES))
                with self._cond:
                    if isinstance(parsed, WorkerAbort):
                        stream = self._streams.get(parsed.request_id)
                        if stream is not None:
                            stream.is_aborted = True
                        sender.send(flags=FINAL)
                        continue
                    request_id = request.request_id() or uuid.uuid4().hex
                    self._streams[request_id] = _Stream(sender, len(parsed.prompt_token_ids), parsed.params.max_tokens)
                    self._cond.notify()
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                sender.send(error_response(exc), flags=FINAL)
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._streams and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                streams = list(self._streams.items())
            step_start_s = time.monotonic()
            for request_id, stream in streams:  # one step: a token for each
                is_done = stream.is_aborted or stream.num_sent + 1 >= stream.max_tokens
                token_ids = [] if stream.is_aborted else [TOKEN_IDS[stream.num_sent % len(TOKEN_IDS)]]
                reason = ("abort" if stream.is_aborted else "length") if is_done else None
                if is_done:
                    with self._cond:
                        del self._streams[request_id]
                if self._responses is None:
                    _send_tokens(stream, (token_ids, reason), is_done)
                else:
                    self._responses.push(stream, (token_ids, reason), is_done)
                stream.num_sent += len(token_ids)
            if self._step_s is not None:
                time.sleep(max(0.0, step_start_s + self._step_s - time.monotonic()))

    def finalize(self):
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(10)
        if self._responses is not None:
            self._responses.close()
        if self._publisher is not None:
            self._publisher.close()


def _send_tokens(stream: _Stream, tokens: tuple[list[int], str | None], is_final: bool) -> None:
    token_ids, reason = tokens
    tensors = [
        int32_tensor("output_ids", token_ids),
        int32_tensor("num_input_tokens", stream.num_prompt_tokens),
        int32_tensor("num_cached_tokens", 0),
    ]
    if reason is not None:
        tensors.append(bytes_tensor("finish_reason", reason))
    stream.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if is_final else 0)


def _merge_tokens(earlier: tuple[list[int], str | None], later: tuple[list[int], str | None]) -> tuple[list[int], str | None]:
    return earlier[0] + later[0], later[1]
