"""The gRPC side of `serving.model_calls`: request encoding, error codes, how a stream ends, notifications."""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from triton_disagg.serving.model_calls import GrpcCalls, infer_request, stream_error_code


def test_a_bytes_input_is_sent_length_prefixed_as_triton_reads_it():
    request = infer_request("router", {"action": np.array([b"route", b"ab"], dtype=np.object_)}, ["decode_worker"])
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("action", "BYTES", [2])
    assert request.raw_input_contents[0] == struct.pack("<I", 5) + b"route" + struct.pack("<I", 2) + b"ab"
    assert [output.name for output in request.outputs] == ["decode_worker"]


def test_numeric_inputs_are_sent_as_their_raw_little_endian_bytes():
    ids = np.array([[1, 2], [3, 4]], dtype=np.int32)
    request = infer_request("decode_0", {"input_ids": ids, "ignore_eos": np.array([True])}, [], request_id="r-1")
    assert request.id == "r-1"
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("input_ids", "INT32", [2, 2]), ("ignore_eos", "BOOL", [1])]
    assert request.raw_input_contents[0] == ids.tobytes()
    assert request.raw_input_contents[1] == b"\x01"


@pytest.mark.parametrize(
    "message, code",
    [
        ("unavailable (all_workers_busy): every decode worker is at its limit", "UNAVAILABLE"),
        ("RuntimeError: the engine thread stopped", "INTERNAL"),
        ("KeyError: 'seq-3'", "INTERNAL"),
        ("max_tokens must be >= 2 with a kv_handle: the first token is already sampled", "INVALID_ARG"),
        ("prompt of 9000 tokens does not fit the KV pool", "INVALID_ARG"),
    ],
)
def test_a_stream_error_code_is_read_from_how_our_models_word_their_errors(message, code):
    assert stream_error_code(message) == code


class _StreamingServer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A gRPC endpoint whose decoupled "model" answers `num_responses` responses, the last one final."""

    def __init__(self, num_responses: int) -> None:
        self.num_responses = num_responses
        self.half_closed = threading.Event()
        self.notified: queue.SimpleQueue = queue.SimpleQueue()
        self.answer = threading.Event()

    def ModelStreamInfer(self, request_iterator, context):
        request = next(request_iterator)
        for index in range(self.num_responses):
            response = service_pb2.ModelStreamInferResponse()
            response.infer_response.model_name = request.model_name
            response.infer_response.parameters["triton_final_response"].bool_param = index == self.num_responses - 1
            yield response
        for _ in request_iterator:  # Triton ends a stream once its client half-closes it
            pass
        self.half_closed.set()

    def ModelInfer(self, request, context):
        self.notified.put(request.model_name)
        self.answer.wait(5)  # a slow model: a notification does not wait for it
        if request.model_name == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'missing' is not found")
        return service_pb2.ModelInferResponse(model_name=request.model_name)


@pytest.fixture
def streaming_server():
    servicer = _StreamingServer(num_responses=3)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, GrpcCalls(f"127.0.0.1:{port}")
    server.stop(grace=None)


def test_a_stream_read_to_its_final_response_is_half_closed_and_ends_ok_never_cancelled(streaming_server):
    # Cancelling a stream as its request completes can leak Triton 2.51's stream state, which holds
    # the model: that model then never finishes unloading.
    servicer, calls = streaming_server
    stream = calls.stream("decode_0", {"input_ids": np.array([1], dtype=np.int32)}, [])
    assert len(list(stream)) == 2  # the final response carries no outputs: it only ends the stream
    assert servicer.half_closed.wait(5)
    assert stream._call.code() == grpc.StatusCode.OK


def test_a_consumer_that_stops_after_the_final_response_still_ends_the_stream_cleanly(streaming_server):
    servicer, calls = streaming_server
    servicer.num_responses = 1
    stream = calls.stream("prefill_0", {"check_hold_id": np.array([b"h"], dtype=np.object_)}, [])
    for _ in stream:
        break  # as a hold check does: it returns on its one response
    assert servicer.half_closed.wait(5)
    assert stream._call.code() == grpc.StatusCode.OK


def test_a_stream_abandoned_mid_request_is_cancelled(streaming_server):
    servicer, calls = streaming_server
    servicer.num_responses = 100
    stream = calls.stream("decode_0", {"input_ids": np.array([1], dtype=np.int32)}, [])
    responses = iter(stream)
    next(responses)
    responses.close()  # the consumer gives up (a worker found dead): nothing is left to wait for
    assert stream._call.code() == grpc.StatusCode.CANCELLED
    assert not servicer.half_closed.is_set()


def test_a_notification_returns_before_its_answer_and_a_failed_one_is_logged(streaming_server, caplog):
    servicer, calls = streaming_server
    calls.notify("router", {"action": np.array([b"complete"], dtype=np.object_)})
    assert servicer.notified.get(timeout=5) == "router"  # sent, and not answered yet
    with caplog.at_level(logging.WARNING, logger="triton_disagg.serving.model_calls"):
        calls.notify("missing", {"action": np.array([b"complete"], dtype=np.object_)})
        assert servicer.notified.get(timeout=5) == "missing"
        servicer.answer.set()
        deadline_s = time.monotonic() + 5
        while "unknown model: 'missing'" not in caplog.text:
            assert time.monotonic() < deadline_s, caplog.text
            time.sleep(0.05)
    assert "router" not in caplog.text
