"""The `llm` model over Triton's gRPC streaming API.

One bidirectional stream per request, on one shared channel. The request is
always sent with `stream` true, so the frontend sees each text delta as it is
produced (and can time it) whether or not its own client streams. Leaving the
iteration early (the client went away, or the task was cancelled) cancels the
gRPC call; Triton marks the request cancelled and the `llm` model aborts it on
its worker, which frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpc_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from triton_disagg.errors import is_unavailable_message
from triton_disagg.frontend.protocol import OpenAIError

LLM_MODEL = "llm"
ROUTER_MODEL = "router"
#: Seconds a readiness or config call to Triton may take before it counts as failed.
PROBE_TIMEOUT_S = 5.0


@dataclass(slots=True, frozen=True)
class GenerateParams:
    """What the frontend asks of the `llm` model for one request."""

    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    #: Start the output with the prompt (completions' `echo`).
    echo: bool = False
    #: Let the tokenizer add BOS; false for chat-template output, which carries its own special tokens.
    add_special_tokens: bool = True


@dataclass(slots=True, frozen=True)
class Delta:
    """New text from one response; counts are cumulative; `finish_reason` comes with the last one."""

    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None


class TritonLLM:
    """Streams generations from the `llm` model of one Triton server."""

    def __init__(self, url: str, model_name: str = LLM_MODEL) -> None:
        self.url = url
        self.model_name = model_name
        self._client = grpc_aio.InferenceServerClient(url)

    async def close(self) -> None:
        await self._client.close()

    async def is_ready(self) -> bool:
        try:
            return await self._client.is_server_ready(client_timeout=PROBE_TIMEOUT_S) and await self._client.is_model_ready(
                self.model_name, client_timeout=PROBE_TIMEOUT_S
            )
        except InferenceServerException:
            return False

    async def num_routable_decode_workers(self) -> int:
        """Decode workers the router could route a request to now (0 when the router cannot be asked)."""
        action = InferInput("action", [1], "BYTES")
        action.set_data_from_numpy(np.array([b"status"], dtype=np.object_))
        try:
            result = await self._client.infer(ROUTER_MODEL, [action], client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException:
            return 0
        return int(result.as_numpy("num_routable_decode").reshape(-1)[0])

    async def model_parameters(self) -> dict[str, str]:
        """The `llm` model's config parameters (model_path, max_model_len)."""
        config = await self._client.get_model_config(self.model_name, as_json=True, client_timeout=PROBE_TIMEOUT_S)
        return {key: value.get("string_value", "") for key, value in config["config"].get("parameters", {}).items()}

    async def generate(self, params: GenerateParams) -> AsyncIterator[Delta]:
        """Yield the request's deltas until the one with a finish reason. Raises OpenAIError on a server error."""
        is_done = asyncio.Event()

        async def requests():
            yield {"model_name": self.model_name, "inputs": _inputs(params)}
            # Keep our side of the stream open until the last response: half-closing it
            # early is not something every server version handles the same way.
            await is_done.wait()

        call = self._client.stream_infer(requests())
        try:
            async for result, error in call:
                if error is not None:
                    raise _openai_error(error)
                delta = _delta(result)
                yield delta
                if delta.finish_reason is not None:
                    return
            raise OpenAIError(502, "the llm model ended the stream without a finish reason", type="server_error")
        except grpc.aio.AioRpcError as e:  # the connection to Triton itself failed
            unreachable = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            raise OpenAIError(
                503 if unreachable else 502, f"Triton at {self.url} failed the call: {e.details()}", type="server_error"
            ) from None
        finally:
            is_done.set()
            call.cancel()  # a no-op once the call has finished


def _inputs(params: GenerateParams) -> list[InferInput]:
    arrays = {
        "text_input": np.array([params.prompt.encode("utf-8")], dtype=np.object_),
        "max_tokens": np.array([params.max_tokens], dtype=np.int32),
        "stream": np.array([True]),
        "temperature": np.array([params.temperature], dtype=np.float32),
        "top_p": np.array([params.top_p], dtype=np.float32),
        "top_k": np.array([params.top_k], dtype=np.int32),
        "ignore_eos": np.array([params.ignore_eos]),
        "exclude_input_in_output": np.array([not params.echo]),
        "return_num_input_tokens": np.array([True]),
        "return_num_output_tokens": np.array([True]),
        "add_special_tokens": np.array([params.add_special_tokens]),
    }
    if params.seed is not None:
        arrays["seed"] = np.array([params.seed], dtype=np.uint64)
    if params.stop:
        arrays["stop_words"] = np.array([s.encode("utf-8") for s in params.stop], dtype=np.object_)
    tensors = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _delta(result) -> Delta:
    text = result.as_numpy("text_output")
    finish_reason = result.as_numpy("finish_reason")
    return Delta(
        text="" if text is None else b"".join(text.reshape(-1)).decode("utf-8"),
        num_input_tokens=int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
        num_output_tokens=int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
        finish_reason=None if finish_reason is None else finish_reason.reshape(-1)[0].decode(),
    )


def _openai_error(error: InferenceServerException) -> OpenAIError:
    """Triton's in-stream errors carry a message but no status code. A server-side condition says so
    in its text ("unavailable (reason): ..."): 503. The frontend validated the request already, so
    anything else the llm model refuses is a limit only it knows (400), and the rest a fault (500)."""
    message = error.message() or str(error)
    if is_unavailable_message(message):
        reason = message.partition("(")[2].partition(")")[0]
        return OpenAIError(503, message, type="service_unavailable", code=reason or None)
    if message.startswith(("max_tokens", "text_input", "stop_words")):
        return OpenAIError(400, message, param="max_tokens" if message.startswith("max_tokens") else None)
    return OpenAIError(500, f"the model server failed the request: {message}", type="server_error")
