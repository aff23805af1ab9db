"""One request's tokens and its progress through the engine."""

from __future__ import annotations

import enum
import time

import torch

from triton_disagg.engine.params import FinishReason, SamplingParams
from triton_disagg.router.hashing import BlockHash, hash_block_tokens


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PULLING_KV = "pulling_kv"  # blocks allocated, prompt KV arriving from a prefill worker
    ONBOARDING = "onboarding"  # blocks allocated, cached prompt KV coming back from host memory or disk
    FINISHED = "finished"


class Sequence:
    """A request in flight: prompt plus output tokens, its blocks and what is computed.

    `num_computed_tokens` counts tokens whose K/V are in the pool (prefix-cache
    hits included). The last sampled token is never computed yet: it is the
    next step's input.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        block_size: int,
        extra_keys: tuple[object, ...] = (),
        generator: torch.Generator | None = None,
    ):
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.block_size = block_size
        self.extra_keys = extra_keys
        self.generator = generator
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (any tier)
        self.num_host_hit_tokens = 0  # ... of them brought back from host memory
        self.num_disk_hit_tokens = 0  # ... of them brought back from disk
        self.num_committed_blocks = 0  # leading blocks already offered to the prefix cache
        self.block_hashes: list[BlockHash] = []
        self.hold_kv = False  # keep the blocks after finishing, for a decode worker to pull
        self.arrival_s = time.monotonic()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def block_tokens(self, block_idx: int) -> list[int]:
        start = block_idx * self.block_size
        return self.token_ids[start : start + self.block_size]

    def hashes_up_to(self, num_blocks: int) -> list[BlockHash]:
        """Chained hashes of the first `num_blocks` full blocks (extends the memo as needed)."""
        while len(self.block_hashes) < num_blocks:
            idx = len(self.block_hashes)
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes.append(hash_block_tokens(parent, self.block_tokens(idx), self.extra_keys))
        return self.block_hashes[:num_blocks]

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_ids})"
        )
