"""The gRPC side of `serving.model_calls`: request encoding and error codes (the calls themselves run in e2e)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from triton_disagg.serving.model_calls import infer_request, stream_error_code


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
