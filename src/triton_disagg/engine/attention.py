"""Paged attention over the worker's KV pool: the layer, its per-step metadata, and the backend contract.

The pool is one contiguous tensor laid out block-major,
`(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`, so every
block (all layers, K and V) is one contiguous byte range and a run of
consecutive block ids is one range too: one registration and few descriptors
for KV transfers.

The layer writes each step's new K/V into the pool, then hands the queries to
an `AttentionBackend`, which reads the context where it lies, by block table
(see `attention_backends.py` for the implementations and how one is chosen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(slots=True)
class PrefillSlice:
    """One sequence's chunk of new tokens inside a step's flat token batch."""

    query_start: int  # offset of the chunk's first token in the flat batch
    num_query_tokens: int
    num_context_tokens: int  # tokens before the chunk already in the pool
    block_ids: torch.Tensor  # (num_blocks_of_seq,) int64, on the pool's device
    block_id_list: list[int] = field(default_factory=list)  # the same, on the host (for planners)


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the pool and what each one attends to.

    Decode tokens (one per sequence) come first in the flat batch and are
    attended as one batch; prefill chunks follow, one slice each.
    """

    slot_block_ids: torch.Tensor  # (T,) int64: pool block of each new token
    slot_offsets: torch.Tensor  # (T,) int64: position inside that block
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # (B, max_blocks) int64, rows padded (with block 0)
    decode_seq_lens: torch.Tensor | None  # (B,) int64, context length including the new token
    prefills: list[PrefillSlice]
    #: Host copies of the decode tables and lengths, for planners that must not read the device.
    decode_block_table_lists: list[list[int]] = field(default_factory=list)
    decode_seq_len_list: list[int] = field(default_factory=list)
    #: How the layers attend; set by the model runner.
    backend: "AttentionBackend | None" = None
    #: What `backend.plan` prepared for this step (kernel work lists, ...), read by its own calls.
    plan: object = field(default=None)


class AttentionBackend(Protocol):
    """Attention of a step's queries over the paged pool; one instance serves every layer of a model.

    The layer has written the step's new K/V into the pool before either
    method runs. Neither may synchronise with the host on CUDA, so a decode
    step can be captured in a CUDA graph (`supports_cuda_graphs`).
    """

    name: str
    supports_cuda_graphs: bool

    def plan(self, meta: AttentionMetadata) -> object:
        """Per-step preparation shared by all layers (on the host); stored in `meta.plan`."""

    def decode(
        self,
        q: torch.Tensor,  # (B, H, D)
        kv_pool: torch.Tensor,  # (N, L, 2, BS, KVH, D)
        layer_idx: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (B, H, D)
        """One query per sequence over its first `decode_seq_lens[b]` tokens."""

    def prefill(
        self,
        q: torch.Tensor,  # (P, H, D): the step's prefill rows, every chunk in order
        k: torch.Tensor,  # (P, KVH, D): their own keys, also in the pool
        v: torch.Tensor,  # (P, KVH, D)
        kv_pool: torch.Tensor,
        layer_idx: int,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (P, H, D)
        """Each chunk's queries, causally, over its context in the pool and its own tokens.

        Chunk c's rows are `query_start - num_decode_tokens` onwards.
        """


class PagedAttention:
    """Writes a layer's new K/V into the pool, then attends through the step's backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx

    def __call__(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, KVH, D)
        v: torch.Tensor,  # (T, KVH, D)
        kv_pool: torch.Tensor,  # (N, L, 2, BS, KVH, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H, D)
        k_cache = kv_pool[:, self.layer_idx, 0]  # (N, BS, KVH, D), a view
        v_cache = kv_pool[:, self.layer_idx, 1]
        k_cache[meta.slot_block_ids, meta.slot_offsets] = k
        v_cache[meta.slot_block_ids, meta.slot_offsets] = v

        backend = meta.backend
        num_decode = meta.num_decode_tokens
        if not meta.prefills:  # decode only: no copy into a shared output
            return backend.decode(q, kv_pool, self.layer_idx, meta)
        if not num_decode:
            return backend.prefill(q, k, v, kv_pool, self.layer_idx, meta)
        out = torch.empty_like(q)
        out[:num_decode] = backend.decode(q[:num_decode], kv_pool, self.layer_idx, meta)
        rows = slice(num_decode, None)
        out[rows] = backend.prefill(q[rows], k[rows], v[rows], kv_pool, self.layer_idx, meta)
        return out
