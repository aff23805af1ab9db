"""OpenAI request and response bodies, and the errors the frontend answers with.

Requests are pydantic models: a wrong type or an out-of-range value becomes a
400 whose `param` names the field. Fields of the OpenAI API this server does
not implement are accepted only at their neutral value (`n=1`, no
`logprobs`, ...); anything else is rejected rather than silently ignored.
Unknown fields are ignored, as OpenAI-compatible servers do, so clients that
send newer fields keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: max_tokens of a completion that does not set it (OpenAI's default for /v1/completions).
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Most stop sequences one request may carry.
MAX_STOP_SEQUENCES = 16


class OpenAIError(Exception):
    """An error answered with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self, status_code: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def _unsupported(value):
    """A field validator for parts of the OpenAI API this server does not implement: only unset passes."""
    if value:
        raise ValueError("is not supported")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    #: Not in OpenAI's API; vLLM and SGLang accept it. 0 disables the filter.
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    #: Not in OpenAI's API; vLLM and SGLang accept it (load generators use it to fix output lengths).
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else stop or []
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(sequences)}")
        if any(not s for s in sequences):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    @field_validator("n")
    @classmethod
    def _check_n(cls, n: int) -> int:
        if n != 1:
            raise ValueError("must be 1: this server returns one choice per request")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _check_penalty(cls, penalty: float) -> float:
        if penalty != 0:
            raise ValueError("is not supported; leave it at 0")
        return penalty

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, logit_bias: dict | None) -> dict | None:
        if logit_bias:
            raise ValueError("is not supported")
        return logit_bias

    @model_validator(mode="after")
    def _check_stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"must be one string (or a list of one); got a list of {len(prompt)}")
        if not (prompt[0] if isinstance(prompt, list) else prompt):
            raise ValueError("is empty; send at least one character")
        return prompt

    _check_unsupported = field_validator("logprobs", "suffix")(_unsupported)

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError("must be 1")
        return best_of

    @property
    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    _check_unsupported = field_validator("logprobs", "tools")(_unsupported)

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, response_format: dict | None) -> dict | None:
        if response_format not in (None, {"type": "text"}):
            raise ValueError("only {'type': 'text'} is supported")
        return response_format

    @model_validator(mode="after")
    def _check_max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as the dicts chat templates expect."""
        return [{"role": m.role, "content": m.text} | ({"name": m.name} if m.name else {}) for m in self.messages]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }
