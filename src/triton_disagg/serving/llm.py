"""The `llm` entry model's request path: text in, tokens from a worker (of this server or another), text out.

A request waits up to `route_wait_s` for a routable decode worker (at start,
or while every worker is being replaced) before it is answered UNAVAILABLE.
When its decode worker fails under it (the stub died, the worker was
unloaded, or it stopped answering a liveness probe), the request moves to
another decode worker (see `serving.migration`), at most `migration_limit` times.
The calls to the decode workers themselves are `serving.decode_client`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

from triton_disagg.engine.params import SamplingParams
from triton_disagg.errors import ServiceUnavailable
from triton_disagg.serving.decode_client import DecodeClient, WorkerStreamError, WorkerUpdate
from triton_disagg.serving.detokenizer import IncrementalDetokenizer
from triton_disagg.serving.kv_directory import DirectoryClient
from triton_disagg.serving.llm_metrics import LLMMetrics
from triton_disagg.serving.model_calls import calls_to
from triton_disagg.serving.migration import WorkerLost, lost_worker_reason, plan_continuation
from triton_disagg.serving.protocol import (
    LLM_INPUT_NAMES,
    GenerateRequest,
    check_context_window,
    check_max_tokens_limit,
    parse_generate_request,
)
from triton_disagg.serving.router_service import Route, RouterClient
from triton_disagg.serving.settings import LLMSettings
from triton_disagg.serving.stop_strings import StopStringMatcher
from triton_disagg.serving.triton_io import (
    CancelCheck,
    bytes_tensor,
    error_response,
    int32_tensor,
    read_inputs,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

#: Seconds between two route attempts while no decode worker is routable.
ROUTE_RETRY_INTERVAL_S = 0.2
logger = logging.getLogger(__name__)


class LLMService:
    """Validates requests synchronously, then relays each one on a thread of its own.

    BLS's decoupled `exec` is a blocking iterator, so a thread per request keeps
    one slow stream from holding up the others and `execute` from blocking.
    """

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.tokenizer = Tokenizer.from_file(str(settings.tokenizer_path))
        calls = calls_to(settings.grpc_url)
        self.router = RouterClient(calls)
        self.decode = DecodeClient(calls)
        self.directory = DirectoryClient(calls)
        self.metrics = LLMMetrics()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def submit(self, request) -> None:
        """Validate one request and start relaying it; a bad request gets its error response at once."""
        sender = request.get_response_sender()
        try:
            parsed = parse_generate_request(read_inputs(request, LLM_INPUT_NAMES))
            prompt_token_ids = self.tokenizer.encode(parsed.prompt, add_special_tokens=parsed.add_special_tokens).ids
            check_max_tokens_limit(parsed.params.max_tokens, self.settings.max_tokens_limit)
            check_context_window(len(prompt_token_ids), parsed.params.max_tokens, self.settings.max_model_len)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the client as an error response
            sender.send(error_response(e), flags=FINAL)
            self.metrics.ended("error")
            return
        relay = _Relay(self, parsed, prompt_token_ids, sender)
        self.metrics.started(len(prompt_token_ids))
        thread = threading.Thread(target=self._run, args=(relay,), name="llm-relay", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Wait up to `timeout_s` for the requests in flight to finish, then publish the last metrics."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.metrics.close()

    def report_lost_worker(self, lost: WorkerLost) -> None:
        """Tell the router to route around a worker that failed under a request, and the KV directory to
        forget a dead one's agent (an unloaded one's goes when it leaves the repository index)."""
        logger.warning("%s; moving its requests to another decode worker", lost)
        try:
            self.router.worker_failed(lost.worker_name)
            if lost.reason == "dead":
                self.directory.forget_model(lost.worker_name)
        except Exception:  # noqa: BLE001 - the router also drops it once its event stream goes silent
            logger.exception("could not report %s to the router or the KV directory", lost.worker_name)

    def _run(self, relay: "_Relay") -> None:
        try:
            relay.run()
        except _ClientGone:
            relay.end_cancelled()
        except WorkerStreamError as e:  # the worker's own verdict (often a bad request): pass it on
            relay.fail(e)
        except ServiceUnavailable as e:  # a server-side condition the client may retry
            logger.warning("request refused: %s", e)
            relay.fail(e)
        except Exception as e:  # noqa: BLE001 - the client gets the error; the log gets the context
            logger.exception("request failed")
            relay.fail(e)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())


class _ClientGone(Exception):
    """The client cancelled while its request waited for a worker."""


class _Relay:
    """One request: worker token ids in, text deltas out, stop words applied, moved when its worker fails."""

    def __init__(self, service: LLMService, request: GenerateRequest, prompt_token_ids: list[int], sender) -> None:
        self._service = service
        self._request = request
        self._sender = sender
        self._num_input_tokens = len(prompt_token_ids)
        self._prompt_token_ids = prompt_token_ids
        self._detokenizer = IncrementalDetokenizer(service.tokenizer, prompt_token_ids)
        self._stop = StopStringMatcher(request.stop_words)
        self._request_id = uuid.uuid4().hex
        self._worker_request_id = self._request_id
        #: Every token the worker(s) generated for this request, in order (what a move continues from).
        self._generated_token_ids: list[int] = []
        self._num_migrations = 0
        self._num_output_tokens = 0
        self._unsent_text = "" if request.exclude_input_in_output else request.prompt
        self._is_done = False
        self._is_prefill_done = False
        self._accepted_at_s = time.monotonic()
        self._last_token_at_s: float | None = None
        self._client_cancelled = CancelCheck(sender)

    def run(self) -> None:
        router = self._service.router
        prompt_token_ids, params = self._prompt_token_ids, self._request.params
        while True:
            self._choice = self._route(prompt_token_ids)
            try:
                self._relay(prompt_token_ids, params)
                return
            except WorkerLost as lost:
                if self._is_done:
                    return  # the client's answer is complete; only the worker's acknowledgement was missing
                self._service.report_lost_worker(lost)
                continuation = plan_continuation(
                    self._prompt_token_ids,
                    self._generated_token_ids,
                    self._request.params.max_tokens,
                    self._num_migrations,
                    self._service.settings.migration_limit,
                    lost,
                )
                self._num_migrations = continuation.migration
                self._service.metrics.migrated()
                prompt_token_ids = continuation.prompt_token_ids
                params = dataclasses.replace(self._request.params, max_tokens=continuation.max_tokens)
            finally:
                router.complete(self._worker_request_id)

    def _route(self, prompt_token_ids: list[int]) -> Route:
        """The router's choice for this attempt; waits up to route_wait_s for a routable decode worker."""
        self._worker_request_id = f"{self._request_id}-{self._num_migrations}"
        self._is_prefill_done = False
        wait_s = self._service.settings.route_wait_s
        deadline_s = time.monotonic() + wait_s
        while True:
            try:
                return self._service.router.route(self._worker_request_id, prompt_token_ids, self._request.routing_mode)
            except ServiceUnavailable as exc:
                if self._sender.is_cancelled():
                    raise _ClientGone from None
                if time.monotonic() >= deadline_s:
                    raise ServiceUnavailable(exc.reason, f"{exc.detail} (waited {wait_s:g} s)") from None
            time.sleep(ROUTE_RETRY_INTERVAL_S)

    def _prefill_done(self) -> None:
        if not self._is_prefill_done:
            self._is_prefill_done = True
            self._service.router.first_token(self._worker_request_id)

    def _relay(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        updates = self._service.decode.updates(self._choice, self._worker_request_id, prompt_token_ids, params)
        for update in updates:
            if self._is_done:
                continue  # stopped early: drain until the worker acknowledges the abort
            if self._client_cancelled():
                self._finish_early(None)
                continue
            self._on_worker_update(update)
        if not self._is_done:
            raise RuntimeError(f"worker ended request {self._worker_request_id} without a finish reason")

    def end_cancelled(self) -> None:
        """The client went away before a worker was found."""
        self._is_done = True
        self._sender.send(flags=FINAL)
        self._service.metrics.ended("cancelled", self._num_output_tokens)

    def fail(self, error: Exception) -> None:
        if self._is_done:
            return
        self._is_done = True
        self._service.metrics.ended("error", self._num_output_tokens)
        if isinstance(error, WorkerStreamError):
            self._sender.send(pb_utils.InferenceResponse(error=error.error), flags=FINAL)
        else:
            self._sender.send(error_response(error), flags=FINAL)

    def _on_worker_update(self, update: WorkerUpdate) -> None:
        finish_reason = update.finish_reason
        if finish_reason == "abort":
            # Nobody asked for it (a client that left is handled before): the worker is being unloaded.
            raise WorkerLost(self._choice.decode_worker, "aborted", "it ended the request unasked (unloaded?)")
        new_token_ids = update.new_token_ids
        if new_token_ids:
            self._time_tokens(len(new_token_ids))
            self._generated_token_ids.extend(new_token_ids)
        self._num_output_tokens += len(new_token_ids)
        text = self._detokenizer.push(new_token_ids)
        if finish_reason is not None:
            text += self._detokenizer.flush()
        self._unsent_text += self._stop.feed(text)
        if self._stop.is_stopped and finish_reason is None:
            self._finish_early("stop")
        elif self._stop.is_stopped or finish_reason is not None:
            self._unsent_text += self._stop.flush()
            self._is_done = True
            self._send("stop" if self._stop.is_stopped else finish_reason)
        elif self._request.stream and self._unsent_text:
            self._send(None)
        if new_token_ids:
            self._prefill_done()  # after the client has its first token: the router's bookkeeping waits

    def _finish_early(self, finish_reason: str | None) -> None:
        """End the client's request before the worker is done (stop word, or client gone: None)."""
        self._is_done = True
        if finish_reason is None:
            self._sender.send(flags=FINAL)
            self._service.metrics.ended("cancelled", self._num_output_tokens)
        else:
            self._send(finish_reason)
        try:
            self._service.decode.abort(self._choice.decode_worker, self._worker_request_id, self._choice.decode_url)
        except WorkerStreamError as exc:
            if lost_worker_reason(exc.error.message()) is None:
                raise
            raise WorkerLost(self._choice.decode_worker, "gone", exc.error.message()) from None

    def _send(self, finish_reason: str | None) -> None:
        request = self._request
        tensors = [bytes_tensor("text_output", self._unsent_text)]
        if request.return_num_input_tokens:
            tensors.append(int32_tensor("num_input_tokens", self._num_input_tokens))
        if request.return_num_output_tokens:
            tensors.append(int32_tensor("num_output_tokens", self._num_output_tokens))
        if finish_reason is not None:
            tensors.append(bytes_tensor("finish_reason", finish_reason))
        self._unsent_text = ""
        flags = FINAL if finish_reason is not None else 0
        self._sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
        if finish_reason is not None:
            # A worker ends a request with "abort" only when it was asked to, for a client that went away.
            outcome = "cancelled" if finish_reason == "abort" else "success"
            self._service.metrics.ended(outcome, self._num_output_tokens)

    def _time_tokens(self, num_new_tokens: int) -> None:
        now_s = time.monotonic()
        if self._last_token_at_s is None:
            self._service.metrics.first_token(now_s - self._accepted_at_s)
            if num_new_tokens > 1:  # came with the first (the worker's sender fell behind): no gap of their own
                self._service.metrics.next_tokens(0.0, num_new_tokens - 1)
        else:
            self._service.metrics.next_tokens(now_s - self._last_token_at_s, num_new_tokens)
        self._last_token_at_s = now_s
