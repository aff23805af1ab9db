"""Reaching a Triton model from inside one: Triton's gRPC endpoint, or in-process BLS.

The models call one another through `ModelCalls` (`llm` the router, the
decode workers and the KV directory; a decode worker the prefill workers and
the KV directory):
`stream()` for a decoupled model, `call()` for a model that answers once.
Inputs are numpy arrays by name, and every answer comes back as a
`ModelResponse` of plain data, so the caller's code is the same for both.
`calls_to(url)` picks: `GrpcCalls` for a gRPC URL (one channel per server,
one HTTP/2 stream per request), `BlsCalls` for "".

`serve` points every model at its own server's gRPC endpoint (the models'
`grpc_url` parameter), because BLS in
Triton 2.51's Python backend is not safe with threads: the stub turns a BLS
response into numpy arrays with the GIL released (`InferRequest::Exec`) or
on a C++ thread that never takes it (decoupled responses,
`ProcessBLSResponseDecoupled`), and BYTES outputs even run Python code
there. A stub that relays requests on several threads then corrupts
reference counts and its heap: under 8 concurrent streams the `llm` stub
died within minutes ("Reference count error detected: an attempt was made to
deallocate the dtype 17 (O)", "malloc(): unaligned tcache chunk",
segfaults), and Triton failed none of its requests; a decode worker, whose
remote prefills each run on their own thread, died the same way. Over gRPC
every object is made by grpc-python under the GIL.

A stream whose request is complete is half-closed, never cancelled (see
`_GrpcStream._close`).

Triton's gRPC stream carries an error's message but not its code, so a
stream error's code is read from the message (`stream_error_code`).

A stream made here is made, read and dropped on the thread that iterates it
(BLS objects never cross threads); `cancel()` may be called from any thread
and ends a gRPC stream at once (a BLS stream has nothing to cancel).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor


logger = logging.getLogger(__name__)

Arrays = Mapping[str, np.ndarray]

#: Seconds a one-answer gRPC call may take (the router and the KV directory answer in milliseconds).
CALL_TIMEOUT_S = 30.0
#: Seconds to wait for the server to end a stream whose request is complete (it takes a round trip).
CLOSE_TIMEOUT_S = 10.0
#: What a failed gRPC call to an unreachable server says; `serving.migration` reads a worker behind it as dead.
UNREACHABLE = "Triton server unreachable"
#: gRPC waits up to two minutes between attempts to reach a server it could not; a worker server
#: started before its entry server, or a server back from a restart, is reached within a second.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(slots=True, frozen=True)
class ModelResponse:
    """One response of a model, as plain data."""

    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    #: The model's error, if it answered with one.
    error_message: str | None = None
    #: Its Triton error code by name ("INVALID_ARG", "UNAVAILABLE", "INTERNAL", ...).
    error_code: str | None = None

    @property
    def has_error(self) -> bool:
        return self.error_message is not None

    def output(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


class ResponseStream(Protocol):
    def __iter__(self) -> Iterator[ModelResponse]: ...

    def cancel(self) -> None:
        """Stop the stream (from any thread); iteration then ends or raises."""


class ModelCalls(Protocol):
    """How to reach the models of one Triton server."""

    def stream(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = "") -> ResponseStream:
        """Send one request to a decoupled model; iterate its responses until the final one.

        Raises (while iterating) RuntimeError naming UNREACHABLE when the server cannot be reached.
        """

    def call(self, model: str, inputs: Arrays, output_names: Sequence[str]) -> ModelResponse:
        """Send one request to a model that answers once; its answer (an error answer included)."""

    def notify(self, model: str, inputs: Arrays) -> None:
        """Send one request whose answer nobody waits for (bookkeeping); a failure is logged."""


class BlsCalls:
    """The models of this server, through BLS. Usable from any thread."""

    def __init__(self) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils

    def stream(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = "") -> ResponseStream:
        return _BlsStream(self, model, inputs, output_names, request_id)

    def call(self, model: str, inputs: Arrays, output_names: Sequence[str]) -> ModelResponse:
        return self._response(self._request(model, inputs, output_names, "").exec())

    def notify(self, model: str, inputs: Arrays) -> None:
        _log_failed_notification(model, self.call(model, inputs, []).error_message)  # BLS's async form needs an event loop: waits

    def _request(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str):
        tensors = [self._pb.Tensor(name, array) for name, array in inputs.items()]
        return self._pb.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=list(output_names), request_id=request_id
        )

    def _response(self, response) -> ModelResponse:
        if response.has_error():
            error = response.error()
            names = {getattr(self._pb.TritonError, name): name for name in _TRITON_ERROR_CODES}
            return ModelResponse(error_message=error.message(), error_code=names.get(error.code(), "INTERNAL"))
        return ModelResponse({tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()})


class _BlsStream:
    def __init__(self, calls: BlsCalls, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str) -> None:
        self._args = (calls, model, inputs, output_names, request_id)

    def __iter__(self) -> Iterator[ModelResponse]:
        calls, model, inputs, output_names, request_id = self._args
        # Made here, on the iterating thread, like every Triton object of the stream.
        for response in calls._request(model, inputs, output_names, request_id).exec(decoupled=True):
            yield calls._response(response)

    def cancel(self) -> None:
        pass  # Triton's BLS has no cancel; the caller aborts the request on the worker instead.


class GrpcCalls:
    """The models of a Triton server (this one, or another), over its gRPC endpoint `url` ("host:port"). Thread-safe."""

    def __init__(self, url: str) -> None:
        self.url = url
        # One channel for every call: requests share its TCP connection as HTTP/2 streams.
        self._channel = grpc.insecure_channel(url, options=CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    def stream(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = "") -> ResponseStream:
        request = infer_request(model, inputs, output_names, request_id)
        # Every response then carries triton_final_response, and an empty final one ends a stream
        # whose last response had no data (an abort's acknowledgement).
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        return _GrpcStream(self, request)

    def call(self, model: str, inputs: Arrays, output_names: Sequence[str]) -> ModelResponse:
        try:
            response = self._stub.ModelInfer(infer_request(model, inputs, output_names), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise RuntimeError(f"{UNREACHABLE} at {self.url}: {error.details()}") from None
            code = _GRPC_STATUS_TO_TRITON.get(error.code(), "INTERNAL")
            return ModelResponse(error_message=error.details() or str(error.code()), error_code=code)
        return _outputs_of(response, output_names)

    def notify(self, model: str, inputs: Arrays) -> None:
        future = self._stub.ModelInfer.future(infer_request(model, inputs, []), timeout=CALL_TIMEOUT_S)
        future.add_done_callback(lambda done: _log_failed_notification(model, _error_of(done)))

    def close(self) -> None:
        self._channel.close()


class _GrpcStream:
    def __init__(self, calls: GrpcCalls, request: "service_pb2.ModelInferRequest") -> None:
        self._calls = calls
        self._request = request
        self._output_names = [output.name for output in request.outputs]
        self._done = threading.Event()
        self._call = None
        self._lock = threading.Lock()

    def _requests(self):
        yield self._request
        # Our side stays open until the final response: the stream then ends cleanly.
        self._done.wait()

    def __iter__(self) -> Iterator[ModelResponse]:
        with self._lock:
            if self._done.is_set():
                return
            self._call = self._calls._stub.ModelStreamInfer(self._requests())
        is_complete = False  # the request's last response has come (known before it is handed out)
        try:
            for message in self._call:
                response = message.infer_response
                final = response.parameters.get("triton_final_response")
                if message.error_message:
                    # An error ends its request; one Triton gave before the request reached a model has no flag.
                    is_complete = final is None or final.bool_param
                    yield ModelResponse(error_message=message.error_message, error_code=stream_error_code(message.error_message))
                    return
                is_complete = final is not None and final.bool_param
                if response.outputs or not is_complete:
                    yield _outputs_of(response, self._output_names)
                if is_complete:
                    return
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._done.is_set():
                return
            raise RuntimeError(f"{UNREACHABLE} at {self._calls.url}: {error.details()}") from None
        finally:
            if is_complete:
                self._close()
            else:  # abandoned mid-request, or failed
                self.cancel()

    def _close(self) -> None:
        """End a stream whose request is complete: half-close it and wait for the server's status.

        Never cancel it: Triton 2.51's stream handler can leak its state for a stream cancelled
        as it completes (the state holds the request, the request holds the model), and a model
        with such a request can never be unloaded (it stays UNLOADING).
        """
        self._done.set()
        try:
            self._call.exception(timeout=CLOSE_TIMEOUT_S)  # waits for the server's status (OK)
        except grpc.FutureTimeoutError:
            self._call.cancel()  # a server that never ends the stream must not hold this thread

    def cancel(self) -> None:
        with self._lock:
            self._done.set()
            call = self._call
        if call is not None:
            call.cancel()  # a no-op once the call has finished


def text_array(value: str) -> np.ndarray:
    """A one-element BYTES input holding `value` (UTF-8)."""
    return np.array([value.encode()], dtype=np.object_)


#: The TritonError codes a response may carry, by name.
_TRITON_ERROR_CODES = ("INVALID_ARG", "UNAVAILABLE", "INTERNAL", "NOT_FOUND", "UNSUPPORTED", "ALREADY_EXISTS", "CANCELLED", "UNKNOWN")
_GRPC_STATUS_TO_TRITON = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARG",
    grpc.StatusCode.NOT_FOUND: "NOT_FOUND",
    grpc.StatusCode.UNIMPLEMENTED: "UNSUPPORTED",
    grpc.StatusCode.ALREADY_EXISTS: "ALREADY_EXISTS",
    grpc.StatusCode.CANCELLED: "CANCELLED",
}
#: How `serving.triton_io.error_response` words an internal error: "ValueError: ...".
_INTERNAL_MESSAGE = re.compile(r"^[A-Z]\w*(Error|Exception): ")


def stream_error_code(message: str) -> str:
    """The Triton error code of an error a worker sent on a gRPC stream, read from its message.

    Our models word them as `serving.triton_io.error_response` does: "unavailable (reason): ..." for
    UNAVAILABLE, "SomeError: ..." for INTERNAL, the bare message for INVALID_ARG (a client mistake).
    """
    if message.startswith("unavailable ("):
        return "UNAVAILABLE"
    if _INTERNAL_MESSAGE.match(message):
        return "INTERNAL"
    return "INVALID_ARG"


def infer_request(
    model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = ""
) -> "service_pb2.ModelInferRequest":
    """A gRPC ModelInferRequest holding `inputs` as raw contents (BYTES length-prefixed, as Triton reads them)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" else array.tobytes()
        request.raw_input_contents.append(raw)
    for name in output_names:
        request.outputs.add(name=name)
    return request


def _outputs_of(response: "service_pb2.ModelInferResponse", output_names: Sequence[str]) -> ModelResponse:
    result = InferResult(response)
    outputs = {}
    for name in output_names or [output.name for output in response.outputs]:
        array = result.as_numpy(name)
        if array is not None:
            outputs[name] = array
    return ModelResponse(outputs)


_grpc_calls: dict[str, GrpcCalls] = {}
_grpc_calls_lock = threading.Lock()
_bls_calls: BlsCalls | None = None


def calls_to(url: str) -> ModelCalls:
    """How to reach the server at gRPC `url` ("host:port"); "" is this server (BLS). One GrpcCalls per URL."""
    global _bls_calls
    if not url:
        if _bls_calls is None:
            _bls_calls = BlsCalls()
        return _bls_calls
    with _grpc_calls_lock:
        calls = _grpc_calls.get(url)
        if calls is None:
            calls = _grpc_calls[url] = GrpcCalls(url)
        return calls


def _error_of(call: "grpc.Future") -> str | None:
    """What a finished gRPC call failed with, or None."""
    exception = call.exception()
    if exception is None:
        return None
    return exception.details() if isinstance(exception, grpc.RpcError) else str(exception)


def _log_failed_notification(model: str, error: str | None) -> None:
    if error is not None:
        logger.warning("a notification to %s failed: %s", model, error)
