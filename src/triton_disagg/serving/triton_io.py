"""Small helpers between Triton's Python-backend objects and numpy."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable

import numpy as np
import triton_python_backend_utils as pb_utils

from triton_disagg.engine.params import SamplingParams
from triton_disagg.errors import InvalidRequest, ServiceUnavailable


def read_inputs(request, names: Iterable[str]) -> dict[str, np.ndarray | None]:
    """The request's input arrays by name; None for an optional input the client left out."""
    inputs = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        inputs[name] = None if tensor is None else tensor.as_numpy()
    return inputs


def bytes_tensor(name: str, text: str) -> "pb_utils.Tensor":
    return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))


def int32_tensor(name: str, values: int | Iterable[int]) -> "pb_utils.Tensor":
    array = np.array([values] if isinstance(values, int) else list(values), dtype=np.int32)
    return pb_utils.Tensor(name, array)


def prompt_arrays(prompt_token_ids: list[int], params: SamplingParams, with_max_tokens: bool = True) -> dict[str, np.ndarray]:
    """A worker request's prompt and sampling inputs by name (`max_tokens` left out for a prefill worker)."""
    arrays = {
        "input_ids": np.array(prompt_token_ids, dtype=np.int32),
        "temperature": np.array([params.temperature], dtype=np.float32),
        "top_k": np.array([params.top_k], dtype=np.int32),
        "top_p": np.array([params.top_p], dtype=np.float32),
        "ignore_eos": np.array([params.ignore_eos], dtype=np.bool_),
    }
    if with_max_tokens:
        arrays["max_tokens"] = np.array([params.max_tokens], dtype=np.int32)
    if params.seed is not None:
        arrays["seed"] = np.array([params.seed], dtype=np.uint64)
    return arrays


def triton_error(message: str, code_name: str | None) -> "pb_utils.TritonError":
    """A TritonError from a message and a code by name (`serving.model_calls`); INTERNAL when unnamed."""
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code_name or "INTERNAL", pb_utils.TritonError.INTERNAL))


def error_response(error: Exception) -> "pb_utils.InferenceResponse":
    """A response carrying `error`: INVALID_ARG for a bad request, UNAVAILABLE for a server-side
    condition (ServiceUnavailable: its message starts "unavailable (reason)"), else INTERNAL."""
    if isinstance(error, pb_utils.TritonError):
        return pb_utils.InferenceResponse(error=error)
    if isinstance(error, InvalidRequest):
        code, message = pb_utils.TritonError.INVALID_ARG, str(error)
    elif isinstance(error, ServiceUnavailable):
        code, message = pb_utils.TritonError.UNAVAILABLE, str(error)
    else:
        code, message = pb_utils.TritonError.INTERNAL, f"{type(error).__name__}: {error}"
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def finalize_service(model) -> None:
    """A model's `finalize`: shut its service (`model._service`) down and free it while the stub still runs.

    Freed later, at interpreter exit, its Triton metric families (`pb_utils.MetricFamily`) would be
    deallocated after the stub's shared memory is gone, and the stub would segfault on its way out.
    """
    model._service.shutdown()
    del model._service
    gc.collect()


class CancelCheck:
    """Whether a decoupled request's client cancelled, asked of Triton at most every `interval_s`.

    Each ask (`sender.is_cancelled()`) is a round trip to the server, as long as
    a response's send: asked for every token, it would double a stream's cost.
    """

    def __init__(self, sender, interval_s: float = 0.05) -> None:
        self._sender = sender
        self._interval_s = interval_s
        self._next_check_s = 0.0

    def __call__(self) -> bool:
        now_s = time.monotonic()
        if now_s < self._next_check_s:
            return False
        self._next_check_s = now_s + self._interval_s
        return self._sender.is_cancelled()
