"""`llm`'s side of the decode workers: start a generation and read it, abort, probe.

Every call here is a Triton call (through `serving.model_calls`, to this
server or, for a route that names one, to the decode worker's server); the
decisions about what a failure means live in `serving.migration` (pure). A
generation's stream is read on a watched thread (`serving.watched_stream`), so a
dead worker surfaces as WorkerLost instead of a stream that never ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_disagg.engine.params import SamplingParams
from triton_disagg.serving.watched_stream import watched_stream
from triton_disagg.serving.migration import WorkerLost, lost_worker_reason
from triton_disagg.serving.protocol import WORKER_OUTPUT_NAMES
from triton_disagg.serving.router_service import Route
from triton_disagg.serving.model_calls import ModelCalls, ModelResponse, calls_to, text_array
from triton_disagg.serving.triton_io import prompt_arrays, triton_error

#: Seconds without a response from the decode worker after which it is probed (see `serving.watched_stream`).
WORKER_PROBE_AFTER_S = 2.0
#: The request id of a liveness probe: an abort of a request no worker has.
PROBE_REQUEST_ID = "liveness-probe"


@dataclasses.dataclass(slots=True, frozen=True)
class WorkerUpdate:
    """One decode worker response, as plain data."""

    new_token_ids: list[int]
    finish_reason: str | None
    #: The worker's error, if it answered with one: its message and TritonError code.
    error_message: str | None = None
    error_code: str | None = None

    @classmethod
    def of(cls, response: ModelResponse) -> "WorkerUpdate":
        if response.has_error:
            return cls([], None, response.error_message, response.error_code)
        token_ids = response.output("output_ids")
        finish_reason = response.output("finish_reason")
        return cls(
            new_token_ids=[] if token_ids is None else token_ids.tolist(),
            finish_reason=None if finish_reason is None else finish_reason.reshape(-1)[0].decode(),
        )

    def merged(self, later: "WorkerUpdate") -> "WorkerUpdate | None":
        """This update and the next as one (their tokens, the later's finish), or None when either is an
        error or this one already finished."""
        if self.error_message is not None or later.error_message is not None or self.finish_reason is not None:
            return None
        return WorkerUpdate(self.new_token_ids + later.new_token_ids, later.finish_reason)


class WorkerStreamError(RuntimeError):
    """The worker answered a request with an error; carries the worker's TritonError."""

    def __init__(self, error: "pb_utils.TritonError") -> None:
        super().__init__(error.message())
        self.error = error


class DecodeClient:
    """Calls to decode workers from the `llm` model. Stateless; usable from any thread."""

    def __init__(self, calls: ModelCalls) -> None:
        self._calls = calls

    def _calls_to(self, server_url: str) -> ModelCalls:
        """The decode worker's server: this one for "", else the one at gRPC `server_url`."""
        return calls_to(server_url) if server_url else self._calls

    def _stream(self, choice: Route, request_id: str, prompt_token_ids: list[int], params: SamplingParams):
        """Start generation on the chosen decode worker; iterate over its responses (blocking)."""
        inputs = prompt_arrays(prompt_token_ids, params)
        if choice.prefill_worker is not None:
            inputs["prefill_worker"] = text_array(choice.prefill_worker)
            if choice.prefill_url:
                inputs["prefill_worker_url"] = text_array(choice.prefill_url)
        if choice.prefill_pool_saturated:
            inputs["prefill_pool_saturated"] = np.array([True], dtype=np.bool_)
        return self._calls_to(choice.decode_url).stream(choice.decode_worker, inputs, WORKER_OUTPUT_NAMES, request_id)

    def updates(
        self, choice: Route, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Iterator["WorkerUpdate"]:
        """The decode worker's responses to a new request, in order, as plain data; responses that
        queued while the caller was busy come as one update.

        Raises WorkerLost when the worker is dead or gone (an error that says so, or a silence and a
        failed probe: see `serving.watched_stream`), WorkerStreamError for its own verdict on the request.
        """
        worker = choice.decode_worker
        updates = watched_stream(
            worker,
            lambda: self._stream(choice, request_id, prompt_token_ids, params),
            WorkerUpdate.of,
            lambda: self.probe(worker, choice.decode_url),
            WORKER_PROBE_AFTER_S,
            merge=WorkerUpdate.merged,
        )
        try:
            for update in updates:
                if update.error_message is not None:
                    if (reason := lost_worker_reason(update.error_message)) is not None:
                        raise WorkerLost(worker, reason, update.error_message)
                    raise WorkerStreamError(triton_error(update.error_message, update.error_code))
                yield update
        except (WorkerLost, WorkerStreamError):
            raise
        except Exception as exc:  # noqa: BLE001 - a failed BLS call: lost, or passed on as it is
            if (reason := lost_worker_reason(str(exc))) is not None:
                raise WorkerLost(worker, reason, str(exc)) from None
            raise

    def probe(self, decode_worker: str, server_url: str = "") -> str | None:
        """None when the decode worker (in the server at gRPC `server_url`; "" this one) answers; else why
        not ("dead" or "gone")."""
        try:
            self.abort(decode_worker, PROBE_REQUEST_ID, server_url)
        except WorkerStreamError as exc:
            return lost_worker_reason(exc.error.message())
        except Exception as exc:  # noqa: BLE001 - a failed BLS call is an answer too
            return lost_worker_reason(str(exc)) or "gone"
        return None

    def abort(self, decode_worker: str, request_id: str, server_url: str = "") -> None:
        """Ask the decode worker (in the server at gRPC `server_url`; "" this one) to abort `request_id`
        and wait for its acknowledgement."""
        inputs = {"abort_request_id": text_array(request_id)}
        for response in self._calls_to(server_url).stream(decode_worker, inputs, []):
            if response.has_error:
                raise WorkerStreamError(triton_error(response.error_message, response.error_code))
