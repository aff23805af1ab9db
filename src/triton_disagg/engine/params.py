"""What a request asks of the engine, and what the engine hands back per step."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from triton_disagg.errors import InvalidRequest

__all__ = ["InvalidRequest", "FinishReason", "SamplingParams", "RequestOutput"]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token, or a stop string
    LENGTH = "length"  # max_tokens or the context window reached
    ABORT = "abort"  # cancelled by the client or the server


@dataclass(slots=True)
class SamplingParams:
    """Per-request decoding settings.

    `temperature == 0` is greedy decoding; `top_k == 0` and `top_p == 1` turn
    those filters off. With a `seed`, sampling is reproducible run to run,
    whatever else shares the batch.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise InvalidRequest naming the first field out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidRequest(f"seed must be in [0, 2**64), got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class RequestOutput:
    """Tokens a request produced in one engine step.

    `new_token_ids` holds only the tokens sampled in this step (empty for a
    step that finished nothing but an abort). `finish_reason` is set on the
    request's last output and never again.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    #: Prompt tokens found in the prefix cache, of which `num_host_hit_tokens` were brought
    #: back from host memory and `num_disk_hit_tokens` from disk (the rest were on the device).
    num_cached_tokens: int = 0
    num_host_hit_tokens: int = 0
    num_disk_hit_tokens: int = 0
    #: For a request whose KV is held for a decode worker: the blocks holding it and
    #: the hashes of its full blocks (set on the final output only).
    held_block_ids: tuple[int, ...] = ()
    held_block_hashes: tuple[int, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
