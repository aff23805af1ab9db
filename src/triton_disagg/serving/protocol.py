"""Request parsing and validation for the `llm` and `worker` models.

Inputs arrive as a mapping from tensor name to numpy array (None when the
client left an optional input out). Everything here is plain Python so it can
be tested without a server; a request that cannot run raises InvalidRequest
naming the offending input, which the models turn into an INVALID_ARG error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from triton_disagg.engine.params import InvalidRequest, SamplingParams
from triton_disagg.router.config import RoutingMode

#: max_tokens of an `llm` request that does not set it.
DEFAULT_MAX_TOKENS = 16

Inputs = Mapping[str, "np.ndarray | None"]

# `llm` inputs: the TensorRT-LLM ensemble's names, so its clients work unchanged.
LLM_INPUT_NAMES = (
    "text_input",
    "max_tokens",
    "stream",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop_words",
    "ignore_eos",
    "exclude_input_in_output",
    "return_num_input_tokens",
    "return_num_output_tokens",
    "routing_mode",
    "add_special_tokens",
)
WORKER_INPUT_NAMES = (
    "input_ids",
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "ignore_eos",
    "abort_request_id",
    "dump_expert_load",
    "describe",
)
WORKER_OUTPUT_NAMES = ("output_ids", "finish_reason", "num_input_tokens", "num_cached_tokens")
DECODE_INPUT_NAMES = WORKER_INPUT_NAMES + (
    "prefill_worker", "prefill_pool_saturated", "kv_handle", "first_token", "prefill_worker_url"
)  # fmt: skip
PREFILL_INPUT_NAMES = (
    "input_ids", "temperature", "top_k", "top_p", "seed", "ignore_eos", "check_hold_id", "dump_expert_load", "describe"
)  # fmt: skip
PREFILL_OUTPUT_NAMES = WORKER_OUTPUT_NAMES + ("kv_handle", "hold_found")


@dataclass(slots=True, frozen=True)
class GenerateRequest:
    """One `llm` request, parsed; the prompt is not tokenized yet."""

    prompt: str
    params: SamplingParams
    stream: bool
    stop_words: tuple[str, ...]
    exclude_input_in_output: bool
    return_num_input_tokens: bool
    return_num_output_tokens: bool
    #: Overrides the router's mode for this request ("kv", "approx", "round_robin", "random").
    routing_mode: str | None = None
    #: Let the tokenizer add its special tokens (BOS); false for a prompt rendered from a chat
    #: template, which carries its own.
    add_special_tokens: bool = True


@dataclass(slots=True, frozen=True)
class WorkerGenerate:
    """A `worker` request to generate from a tokenized prompt."""

    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True, frozen=True)
class DecodeGenerate:
    """A decode worker request: a prompt to prefill locally, or remotely, or already prefilled.

    `prefill_worker` offers a prefill worker (the decode worker decides);
    `kv_handle` with `first_token_id` says the prompt was prefilled already.
    """

    prompt_token_ids: list[int]
    params: SamplingParams
    prefill_worker: str | None = None
    prefill_pool_saturated: bool = False
    kv_handle: bytes | None = None
    first_token_id: int | None = None
    #: gRPC endpoint of the prefill worker's server; "": the decode worker's own server.
    prefill_worker_url: str = ""


@dataclass(slots=True, frozen=True)
class HoldCheck:
    """A prefill worker control request: is the KV hold `hold_id` still held?"""

    hold_id: str


@dataclass(slots=True, frozen=True)
class ExpertLoadRequest:
    """A worker control request: send the expert-load snapshot (`dump_expert_load: true`)."""


@dataclass(slots=True, frozen=True)
class WorkerDescribe:
    """A worker control request: say where the worker's KV events are (`describe: true`)."""


@dataclass(slots=True, frozen=True)
class WorkerAbort:
    """A `worker` control request: abort the in-flight request `request_id`."""

    request_id: str


def parse_generate_request(inputs: Inputs, *, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerateRequest:
    """Parse and range-check an `llm` request. Raises InvalidRequest."""
    prompt = _decode_utf8("text_input", _scalar(inputs, "text_input", None))
    if prompt is None:
        raise InvalidRequest("text_input is required")
    if not prompt:
        raise InvalidRequest("text_input is empty; send a prompt of at least one character")
    params = _sampling_params(inputs, default_max_tokens)
    stop_words = inputs.get("stop_words")
    return GenerateRequest(
        prompt=prompt,
        params=params,
        stream=_bool(inputs, "stream", False),
        stop_words=() if stop_words is None else tuple(_decode_utf8("stop_words", w) for w in stop_words.reshape(-1)),
        exclude_input_in_output=_bool(inputs, "exclude_input_in_output", False),
        return_num_input_tokens=_bool(inputs, "return_num_input_tokens", False),
        return_num_output_tokens=_bool(inputs, "return_num_output_tokens", False),
        routing_mode=_routing_mode_name(_decode_utf8("routing_mode", _scalar(inputs, "routing_mode", None))),
        add_special_tokens=_bool(inputs, "add_special_tokens", True),
    )


def check_context_window(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """Raise InvalidRequest unless the prompt plus `max_tokens` new tokens fit in `max_model_len`."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequest(
            f"text_input is {num_prompt_tokens} tokens long, which does not fit the context window of "
            f"{max_model_len} tokens; shorten the prompt"
        )
    room = max_model_len - num_prompt_tokens
    if max_tokens > room:
        raise InvalidRequest(
            f"max_tokens ({max_tokens}) is above the limit of {room} for this prompt: {num_prompt_tokens} prompt "
            f"tokens + max_tokens must fit the context window of {max_model_len} tokens"
        )


def check_max_tokens_limit(max_tokens: int, max_tokens_limit: int | None) -> None:
    """Raise InvalidRequest when `max_tokens` is over the server's configured limit (None: no limit)."""
    if max_tokens_limit is not None and max_tokens > max_tokens_limit:
        raise InvalidRequest(f"max_tokens ({max_tokens}) is above this server's limit of {max_tokens_limit}; ask for fewer")


def parse_worker_request(inputs: Inputs) -> WorkerGenerate | WorkerAbort | ExpertLoadRequest | WorkerDescribe:
    """Parse a `worker` request: a generate request, an abort when `abort_request_id` is set,
    an expert-load dump when `dump_expert_load` is true, or a description when `describe` is."""
    if _bool(inputs, "dump_expert_load", False):
        return ExpertLoadRequest()
    if _bool(inputs, "describe", False):
        return WorkerDescribe()
    abort_request_id = _scalar(inputs, "abort_request_id", None)
    if abort_request_id is not None:
        return WorkerAbort(_decode_utf8("abort_request_id", abort_request_id))
    input_ids = inputs.get("input_ids")
    if input_ids is None or input_ids.size == 0:
        raise InvalidRequest("input_ids is required and must hold at least one token id")
    return WorkerGenerate(
        prompt_token_ids=[int(t) for t in input_ids.reshape(-1)],
        params=_sampling_params(inputs, DEFAULT_MAX_TOKENS),
    )


def parse_decode_request(inputs: Inputs) -> DecodeGenerate | WorkerAbort | ExpertLoadRequest | WorkerDescribe:
    """Parse a decode worker request (see `DecodeGenerate`). Raises InvalidRequest."""
    parsed = parse_worker_request(inputs)
    if isinstance(parsed, (WorkerAbort, ExpertLoadRequest, WorkerDescribe)):
        return parsed
    kv_handle = inputs.get("kv_handle")
    first_token = _scalar(inputs, "first_token", None)
    if (kv_handle is None) != (first_token is None):
        raise InvalidRequest("kv_handle and first_token go together: send both or neither")
    return DecodeGenerate(
        prompt_token_ids=parsed.prompt_token_ids,
        params=parsed.params,
        prefill_worker=_decode_utf8("prefill_worker", _scalar(inputs, "prefill_worker", None)) or None,
        prefill_pool_saturated=_bool(inputs, "prefill_pool_saturated", False),
        kv_handle=None if kv_handle is None else np.asarray(kv_handle, dtype=np.uint8).tobytes(),
        first_token_id=None if first_token is None else int(first_token),
        prefill_worker_url=_decode_utf8("prefill_worker_url", _scalar(inputs, "prefill_worker_url", None)) or "",
    )


def parse_prefill_request(inputs: Inputs) -> WorkerGenerate | HoldCheck | ExpertLoadRequest | WorkerDescribe:
    """Parse a prefill worker request: a prompt (its first token is sampled), a hold check, an expert-load
    dump, or a description."""
    if _bool(inputs, "dump_expert_load", False):
        return ExpertLoadRequest()
    if _bool(inputs, "describe", False):
        return WorkerDescribe()
    hold_id = _scalar(inputs, "check_hold_id", None)
    if hold_id is not None:
        return HoldCheck(_decode_utf8("check_hold_id", hold_id))
    parsed = parse_worker_request({**inputs, "max_tokens": None})
    return WorkerGenerate(parsed.prompt_token_ids, dataclasses.replace(parsed.params, max_tokens=1))


def parse_routing_mode(text: str | None) -> RoutingMode | None:
    """A request's routing mode; empty or absent keeps the router's configured mode. Raises InvalidRequest."""
    text = (text or "").strip().lower()
    if not text:
        return None
    try:
        return RoutingMode(text)
    except ValueError:
        modes = ", ".join(m.value for m in RoutingMode)
        raise InvalidRequest(f"routing_mode must be one of {modes}, got {text!r}") from None


def _routing_mode_name(text: str | None) -> str | None:
    mode = parse_routing_mode(text)
    return None if mode is None else mode.value


def _sampling_params(inputs: Inputs, default_max_tokens: int) -> SamplingParams:
    seed = _scalar(inputs, "seed", None)
    params = SamplingParams(
        max_tokens=int(_scalar(inputs, "max_tokens", default_max_tokens)),
        temperature=float(_scalar(inputs, "temperature", 0.0)),
        top_k=int(_scalar(inputs, "top_k", 0)),
        top_p=float(_scalar(inputs, "top_p", 1.0)),
        seed=None if seed is None else int(seed),
        ignore_eos=_bool(inputs, "ignore_eos", False),
    )
    params.validate()
    return params


def _scalar(inputs: Inputs, name: str, default):
    array = inputs.get(name)
    if array is None:
        return default
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got {flat.size}")
    value = flat[0]
    return value.item() if isinstance(value, np.generic) else value


def _bool(inputs: Inputs, name: str, default: bool) -> bool:
    return bool(_scalar(inputs, name, default))


def _decode_utf8(name: str, value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"{name} is not valid UTF-8 (byte {e.start}: {e.reason}); send UTF-8 text") from None
