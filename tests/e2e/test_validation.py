"""Bad requests get a clear INVALID_ARG error, and the server keeps serving."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

CONTEXT_WINDOW = 4096  # the default model's max_position_embeddings


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text_input": ""}, "text_input is empty"),
        ({"max_tokens": 3}, "text_input is required"),
        ({"text_input": "hi", "max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"text_input": "hi", "max_tokens": -5}, "max_tokens must be an integer >= 1, got -5"),
        ({"text_input": "hi", "max_tokens": CONTEXT_WINDOW}, f"max_tokens ({CONTEXT_WINDOW}) is above the limit"),
        ({"text_input": "x" * CONTEXT_WINDOW, "max_tokens": 1}, "does not fit the context window of 4096"),
        ({"text_input": "hi", "temperature": -0.5}, "temperature must be >= 0"),
        ({"text_input": "hi", "top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"text_input": "hi", "top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"text_input": "hi", "top_k": -1}, "top_k must be an integer >= 0"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_request_then_good_request(client, body, message):
    response = client.post_generate(**body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert client.generate(text_input="hi", max_tokens=2)["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"text_input": np.array([b"\xff\xfeok"], dtype=np.object_)}, "text_input is not valid UTF-8"),
        (
            {"text_input": np.array([b"hi"], dtype=np.object_), "max_tokens": np.array([2.0], dtype=np.float32)},
            "inference input 'max_tokens' data-type is 'FP32', but model 'llm' expects 'INT32'",
        ),
        (
            {"text_input": np.array([b"hi"], dtype=np.object_), "max_token": np.array([2], dtype=np.int32)},
            "unexpected inference input 'max_token' for model 'llm'",
        ),
    ],
    ids=["non-utf8", "wrong-dtype", "unknown-input"],
)
def test_bad_request_over_grpc(client, inputs, message):
    """Raw bytes and exact dtypes can only be sent through the binary protocols."""
    [error] = client.grpc_stream(inputs)
    assert message in error.message()
    assert client.generate(text_input="hi", max_tokens=2)["finish_reason"] in ("length", "stop")
