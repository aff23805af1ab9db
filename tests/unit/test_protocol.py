"""Parsing and validation of `llm` and `worker` requests."""

import numpy as np
import pytest

from triton_disagg.engine.params import InvalidRequest
from triton_disagg.serving.protocol import (
    DEFAULT_MAX_TOKENS,
    ExpertLoadRequest,
    WorkerAbort,
    WorkerGenerate,
    check_context_window,
    parse_decode_request,
    parse_generate_request,
    parse_prefill_request,
    parse_worker_request,
)


def llm_inputs(**overrides):
    """The inputs of an `llm` request as the model sees them: name -> array."""
    inputs = {"text_input": np.array([b"hello"], dtype=np.object_)}
    for name, value in overrides.items():
        if value is None:
            inputs.pop(name, None)
        elif isinstance(value, np.ndarray):
            inputs[name] = value
        elif isinstance(value, bytes):
            inputs[name] = np.array([value], dtype=np.object_)
        else:
            inputs[name] = np.array([value])
    return inputs


def test_defaults():
    request = parse_generate_request(llm_inputs())
    assert request.prompt == "hello"
    assert request.params.max_tokens == DEFAULT_MAX_TOKENS
    assert request.params.is_greedy and request.params.seed is None
    assert not request.stream and not request.exclude_input_in_output
    assert request.stop_words == ()
    assert request.add_special_tokens


def test_every_field():
    request = parse_generate_request(
        llm_inputs(
            max_tokens=np.array([7], dtype=np.int32),
            stream=np.array([True]),
            temperature=np.array([0.5], dtype=np.float32),
            top_k=np.array([3], dtype=np.int32),
            top_p=np.array([0.75], dtype=np.float32),
            seed=np.array([2**63 + 1], dtype=np.uint64),
            stop_words=np.array([b"END", "日本".encode()], dtype=np.object_),
            ignore_eos=np.array([True]),
            exclude_input_in_output=np.array([True]),
            return_num_input_tokens=np.array([True]),
            return_num_output_tokens=np.array([True]),
            add_special_tokens=np.array([False]),
        )
    )
    params = request.params
    assert (params.max_tokens, params.temperature, params.top_k, params.top_p) == (7, 0.5, 3, 0.75)
    assert params.seed == 2**63 + 1 and params.ignore_eos
    assert request.stop_words == ("END", "日本")
    assert request.stream and request.exclude_input_in_output
    assert request.return_num_input_tokens and request.return_num_output_tokens
    assert not request.add_special_tokens


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"text_input": None}, "text_input is required"),
        ({"text_input": b""}, "text_input is empty"),
        ({"text_input": b"\xff\xfe"}, "text_input is not valid UTF-8"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop_words": np.array([b"\xc3"], dtype=np.object_)}, "stop_words is not valid UTF-8"),
        ({"max_tokens": np.array([1, 2], dtype=np.int32)}, "max_tokens must hold exactly one value"),
    ],
)
def test_bad_request_names_the_input(overrides, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_generate_request(llm_inputs(**overrides))


def test_context_window_fits_exactly():
    check_context_window(num_prompt_tokens=10, max_tokens=6, max_model_len=16)


def test_prompt_longer_than_context_window():
    with pytest.raises(InvalidRequest, match="text_input is 16 tokens long.*context window of 16"):
        check_context_window(num_prompt_tokens=16, max_tokens=1, max_model_len=16)


def test_max_tokens_above_the_room_left():
    with pytest.raises(InvalidRequest, match=r"max_tokens \(7\) is above the limit of 6"):
        check_context_window(num_prompt_tokens=10, max_tokens=7, max_model_len=16)


def test_worker_generate():
    parsed = parse_worker_request(
        {"input_ids": np.array([256, 104, 105], dtype=np.int32), "max_tokens": np.array([4], dtype=np.int32)}
    )
    assert isinstance(parsed, WorkerGenerate)
    assert parsed.prompt_token_ids == [256, 104, 105]
    assert parsed.params.max_tokens == 4


def test_worker_abort_needs_nothing_else():
    parsed = parse_worker_request({"abort_request_id": np.array([b"abc123"], dtype=np.object_)})
    assert parsed == WorkerAbort("abc123")


@pytest.mark.parametrize("parse", [parse_worker_request, parse_decode_request, parse_prefill_request])
def test_an_expert_load_dump_needs_nothing_else(parse):
    assert parse({"dump_expert_load": np.array([True])}) == ExpertLoadRequest()
    # false is an ordinary request, which then needs its prompt
    with pytest.raises(InvalidRequest, match="input_ids is required"):
        parse({"dump_expert_load": np.array([False])})


def test_worker_request_without_tokens():
    with pytest.raises(InvalidRequest, match="input_ids is required"):
        parse_worker_request({"input_ids": np.array([], dtype=np.int32)})
