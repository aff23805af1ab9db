"""Runs an `LLMEngine` on its own thread; other threads submit and abort requests.

The engine is not thread-safe, so every mutation goes through a command
queue that the engine thread drains between steps. Callbacks run on the
engine thread: keep them short (hand the tokens to a response sender).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from triton_disagg.engine.kv_connector import RemoteKV
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
)

logger = logging.getLogger(__name__)

OnOutput = Callable[[RequestOutput], None]
OnError = Callable[[Exception], None]


#: How often the loop wakes while only KV holds or pulls are pending (no request running).
#: Each wake polls NIXL, which is also what makes its transfers progress.
KV_POLL_INTERVAL_S = 0.0005


@dataclass(slots=True)
class _Submission:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: OnOutput
    on_error: OnError
    hold_kv: bool = False
    remote_kv: RemoteKV | None = None


class EngineThread:
    """Owns the engine loop: sleeps while idle, steps while any request is unfinished."""

    def __init__(self, engine: LLMEngine, name: str = "engine", after_step: Callable[[], None] | None = None):
        """`after_step` runs on the engine thread after every step (e.g. to publish metrics)."""
        self.engine = engine
        self._after_step = after_step
        self._cond = threading.Condition()
        self._submissions: list[_Submission] = []
        self._aborts: list[str] = []
        self._callbacks: dict[str, tuple[OnOutput, OnError]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        engine.set_copy_done_callback(self._wake)

    def start(self) -> None:
        self._thread.start()

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        on_output: OnOutput,
        on_error: OnError,
        hold_kv: bool = False,
        remote_kv: RemoteKV | None = None,
    ) -> None:
        """Queue a request (see `LLMEngine.add_request` for `hold_kv` and `remote_kv`).

        Raises InvalidRequest at once for a request that can never run.
        """
        self.engine.validate_request(prompt_token_ids, params)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            if request_id in self._callbacks:
                raise InvalidRequest(f"request id {request_id!r} is already running")
            self._callbacks[request_id] = (on_output, on_error)
            self._submissions.append(
                _Submission(request_id, prompt_token_ids, params, on_output, on_error, hold_kv, remote_kv)
            )
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request; its callback gets a final ABORT output. Unknown ids are ignored."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort everything in flight and join the thread."""
        with self._cond:
            self._stopping = True
            self._aborts.extend(self._callbacks)
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _wake(self) -> None:
        """A KV tier copy finished (called on the copier thread): let the engine thread apply it."""
        with self._cond:
            self._cond.notify()

    # -- engine thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                # The condition is checked under the lock the copier notifies with, so no wake-up is lost.
                while not (self._submissions or self._aborts or self._stopping or self.engine.has_work()):
                    if self.engine.needs_polling():
                        self._cond.wait(KV_POLL_INTERVAL_S)
                        break
                    self._cond.wait()
                submissions, self._submissions = self._submissions, []
                aborts, self._aborts = self._aborts, []
                stopping = self._stopping
            for sub in submissions:
                try:
                    self.engine.add_request(
                        sub.request_id, sub.prompt_token_ids, sub.params, hold_kv=sub.hold_kv, remote_kv=sub.remote_kv
                    )
                except Exception as exc:  # noqa: BLE001 - reported to the request's owner
                    self._fail(sub.request_id, exc)
            for request_id in aborts:
                if not self.engine.abort_request(request_id) and stopping:
                    self._deliver(RequestOutput(request_id, finish_reason=FinishReason.ABORT))
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a broken step fails the requests in it, not the server
                logger.exception("engine step failed; failing every request in flight")
                self._fail_all(exc)
                continue
            for output in outputs:
                self._deliver(output)
            if self._after_step is not None:
                self._after_step()
            if stopping and not self.engine.has_unfinished_requests():
                return

    def _deliver(self, output: RequestOutput) -> None:
        with self._cond:
            callbacks = self._callbacks.get(output.request_id)
            if callbacks is not None and output.finished:
                del self._callbacks[output.request_id]
        if callbacks is None:
            return
        try:
            callbacks[0](output)
        except Exception:  # noqa: BLE001 - the receiver is gone; stop generating for it
            logger.exception("output callback of request %s failed; aborting it", output.request_id)
            if not output.finished:
                self.engine.abort_request(output.request_id)

    def _fail(self, request_id: str, exc: Exception) -> None:
        with self._cond:
            callbacks = self._callbacks.pop(request_id, None)
        if callbacks is not None:
            callbacks[1](exc)

    def _fail_all(self, exc: Exception) -> None:
        with self._cond:
            request_ids = list(self._callbacks)
        for request_id in request_ids:
            self.engine.abort_request(request_id)  # its ABORT output finds no callback: dropped
            self._fail(request_id, exc)
