"""Reaching a Triton model from inside one: in-process BLS on this server, Triton gRPC on another.

The request path calls decode and prefill workers, the router and the KV
directory through `ModelCalls`: `stream()` for a decoupled model, `call()`
for a model that answers once. Inputs are numpy arrays by name, and every
answer comes back as a `ModelResponse` of plain data, so the caller's code is
the same whether the model runs in this server (`BlsCalls`, the fast path) or
in another one (`GrpcCalls`: one channel per server, one HTTP/2 stream per
request). `calls_to(url)` picks: an empty URL is this server.

A stream made here is made, read and dropped on the thread that iterates it
(BLS objects never cross threads); `cancel()` may be called from any thread
and ends a gRPC stream at once (a BLS stream has nothing to cancel).
"""

from __future__ import annotations

import logging
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
    #: Its TritonError code (in-process calls only; Triton's gRPC stream carries the message alone).
    error_code: int | None = None

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


class BlsCalls:
    """The models of this server, through BLS. Usable from any thread."""

    def __init__(self) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils

    def stream(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = "") -> ResponseStream:
        return _BlsStream(self, model, inputs, output_names, request_id)

    def call(self, model: str, inputs: Arrays, output_names: Sequence[str]) -> ModelResponse:
        return self._response(self._request(model, inputs, output_names, "").exec())

    def _request(self, model: str, inputs: Arrays, output_names: Sequence[str], request_id: str):
        tensors = [self._pb.Tensor(name, array) for name, array in inputs.items()]
        return self._pb.InferenceRequest(
            model_name=model, inputs=tensors, requested_output_names=list(output_names), request_id=request_id
        )

    def _response(self, response) -> ModelResponse:
        if response.has_error():
            error = response.error()
            return ModelResponse(error_message=error.message(), error_code=int(error.code()))
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
    """The models of another Triton server, over its gRPC endpoint `url` ("host:port"). Thread-safe."""

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
            return ModelResponse(error_message=error.details() or str(error.code()))
        return _outputs_of(response, output_names)

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
        try:
            for message in self._call:
                if message.error_message:
                    yield ModelResponse(error_message=message.error_message)
                    return
                response = message.infer_response
                final = response.parameters.get("triton_final_response")
                if response.outputs or not (final and final.bool_param):
                    yield _outputs_of(response, self._output_names)
                if final is not None and final.bool_param:
                    return
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.CANCELLED and self._done.is_set():
                return
            raise RuntimeError(f"{UNREACHABLE} at {self._calls.url}: {error.details()}") from None
        finally:
            self.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._done.set()
            call = self._call
        if call is not None:
            call.cancel()  # a no-op once the call has finished


def infer_request(
    model: str, inputs: Arrays, output_names: Sequence[str], request_id: str = ""
) -> "service_pb2.ModelInferRequest":
    """A gRPC ModelInferRequest holding `inputs` as raw contents (BYTES length-prefixed, as Triton reads them)."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        datatype = np_to_triton_dtype(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            serialized = serialize_byte_tensor(array)  # a 0-d object array holding the bytes
            raw = serialized.item() if serialized.size else b""
        else:
            raw = array.tobytes()
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
