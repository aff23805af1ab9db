"""Paged attention over the worker's KV pool, in plain PyTorch (CPU or CUDA).

The pool is one contiguous tensor laid out block-major,
`(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`, so every
block (all layers, K and V) is one contiguous byte range and a run of
consecutive block ids is one range too: one registration and few descriptors
for KV transfers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSlice:
    """One sequence's chunk of new tokens inside a step's flat token batch."""

    query_start: int  # offset of the chunk's first token in the flat batch
    num_query_tokens: int
    num_context_tokens: int  # tokens before the chunk already in the pool
    block_ids: torch.Tensor  # (num_blocks_of_seq,) int64, on the pool's device


@dataclass(slots=True)
class AttentionMetadata:
    """Where a step's tokens go in the pool and what each one attends to.

    Decode tokens (one per sequence) come first in the flat batch and are
    attended as one padded batch; prefill chunks follow, one slice each.
    """

    slot_block_ids: torch.Tensor  # (T,) int64: pool block of each new token
    slot_offsets: torch.Tensor  # (T,) int64: position inside that block
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # (B, max_blocks) int64, padded with block 0
    decode_seq_lens: torch.Tensor | None  # (B,) int64, context length including the new token
    prefills: list[PrefillSlice]


class PagedAttention:
    """Writes a layer's new K/V into the pool, then attends over each sequence's blocks."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5

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

        out = torch.empty_like(q)
        num_decode = meta.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q[:num_decode], k_cache, v_cache, meta)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_query_tokens)
            out[rows] = self._prefill(q[rows], k_cache, v_cache, chunk)
        return out

    def _gather(self, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        blocks = cache[block_ids]  # (..., nb, BS, KVH, D)
        return blocks.flatten(-4, -3)  # (..., nb*BS, KVH, D)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        keys = self._gather(k_cache, meta.decode_block_tables).transpose(1, 2)  # (B, KVH, S, D)
        values = self._gather(v_cache, meta.decode_block_tables).transpose(1, 2)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self._is_gqa
        )  # (B, H, 1, D)
        return out.squeeze(2)

    def _prefill(self, q, k_cache, v_cache, chunk: PrefillSlice) -> torch.Tensor:
        num_keys = chunk.num_context_tokens + chunk.num_query_tokens
        # 4-D inputs: CPU SDPA takes its fused kernel only for (B, H, S, D).
        keys = self._gather(k_cache, chunk.block_ids)[:num_keys].transpose(0, 1).unsqueeze(0)  # (1, KVH, S, D)
        values = self._gather(v_cache, chunk.block_ids)[:num_keys].transpose(0, 1).unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
        if chunk.num_context_tokens == 0:
            out = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=self.scale, enable_gqa=self._is_gqa
            )
        else:
            # Query i sits at absolute position num_context_tokens + i.
            q_pos = torch.arange(chunk.num_query_tokens, device=q.device) + chunk.num_context_tokens
            k_pos = torch.arange(num_keys, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # (Q, S)
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self._is_gqa
            )
        return out[0].transpose(0, 1)  # (Q, H, D)

    @property
    def _is_gqa(self) -> bool:
        return self.num_heads != self.num_kv_heads
