"""Paged attention on CUDA with a real paged kernel, reading the pool in place by block table.

- `flashinfer`: FlashInfer's batch decode and batch prefill over a paged KV
  cache (any block size). The pool's layer view `kv_pool[:, layer]` is
  FlashInfer's NHD layout `(pages, 2, page_size, kv_heads, head_dim)`, with
  pages `layers * 2 * page_size * kv_heads * head_dim` elements apart; the
  page table is planned once per step (on the host) and shared by every layer.
- `flash_attn`: FlashAttention's `flash_attn_with_kvcache(block_table=...)`,
  whose paged KV needs blocks of a multiple of 256 tokens.

Each is used when its package imports and the shape fits; `cuda_backend`
says why not otherwise. Neither runs on the machines this project is
developed on (no GPU): the tests in `tests/unit/test_paged_attention.py`
check them against a float64 reference when TRITON_DISAGG_TEST_DEVICE=cuda.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from triton_disagg.engine.attention import AttentionMetadata

#: FlashInfer's scratch space, per backend instance (its documented default size).
WORKSPACE_BYTES = 128 * 2**20


def cuda_backend(name: str, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
    """(backend, None), or (None, why not) for `name` in "auto", "flashinfer", "flash_attn"."""
    reasons = []
    if name in ("auto", "flashinfer"):
        if importlib.util.find_spec("flashinfer") is not None:
            return FlashInferAttention(dtype, num_heads, num_kv_heads, head_dim, block_size), None
        reasons.append("flashinfer is not installed")
    if name in ("auto", "flash_attn"):
        if importlib.util.find_spec("flash_attn") is None:
            reasons.append("flash_attn is not installed")
        elif block_size % 256:
            reasons.append(f"flash_attn's paged KV needs a block size that is a multiple of 256, not {block_size}")
        else:
            return FlashAttnAttention(num_heads, num_kv_heads, head_dim), None
    return None, "; ".join(reasons)


@dataclass(slots=True)
class _PagedTable:
    """A batch's block tables in CSR form, as FlashInfer takes them (int32, on the device)."""

    indptr: torch.Tensor  # (B + 1,)
    indices: torch.Tensor  # (sum of blocks,)
    last_page_len: torch.Tensor  # (B,) tokens in each sequence's last block, 1..block_size


def paged_table(block_tables: list[list[int]], seq_lens: list[int], block_size: int, device: torch.device) -> _PagedTable:
    """CSR block tables of sequences `b` holding `seq_lens[b]` tokens in `block_tables[b]` (host lists in)."""
    counts = [-(-length // block_size) for length in seq_lens]
    indptr = [0]
    for count in counts:
        indptr.append(indptr[-1] + count)
    indices = [block for table, count in zip(block_tables, counts) for block in table[:count]]
    last = [length - (count - 1) * block_size for length, count in zip(seq_lens, counts)]

    def to_device(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32).pin_memory().to(device, non_blocking=True)

    return _PagedTable(to_device(indptr), to_device(indices), to_device(last))


class FlashInferAttention:
    """FlashInfer paged decode and prefill; `plan` runs FlashInfer's planners once per step."""

    name = "flashinfer"
    supports_cuda_graphs = False  # decode graphs use `graph_decode_wrapper`, one per captured size

    def __init__(self, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        import flashinfer

        self._flashinfer = flashinfer
        self.dtype = dtype
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.scale = head_dim**-0.5
        self._workspace: torch.Tensor | None = None
        self._decode = self._prefill = None

    def _wrappers(self, device: torch.device):
        if self._workspace is None:
            self._workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            self._decode = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(self._workspace, "NHD")
            self._prefill = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")
        return self._decode, self._prefill

    def plan(self, meta: AttentionMetadata) -> object:
        device = meta.slot_block_ids.device
        decode, prefill = self._wrappers(device)
        dtype = self.dtype
        if meta.num_decode_tokens:  # from the host copies: planning never waits on the device
            table = paged_table(meta.decode_block_table_lists, meta.decode_seq_len_list, self.block_size, device)
            self.plan_decode(decode, table)
        if meta.prefills:
            chunks = meta.prefills
            qo_indptr = torch.zeros(len(chunks) + 1, dtype=torch.int32)
            qo_indptr[1:] = torch.tensor([c.num_query_tokens for c in chunks], dtype=torch.int32).cumsum(0)
            lens = [c.num_context_tokens + c.num_query_tokens for c in chunks]
            table = paged_table([c.block_id_list for c in chunks], lens, self.block_size, device)
            prefill.plan(
                qo_indptr.to(device), table.indptr, table.indices, table.last_page_len,
                self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                causal=True, sm_scale=self.scale, q_data_type=dtype, kv_data_type=dtype,
            )  # fmt: skip
        return None

    def plan_decode(self, wrapper, table: _PagedTable) -> None:
        """Plan a decode wrapper (this backend's, or a captured graph's) for `table`."""
        wrapper.plan(
            table.indptr, table.indices, table.last_page_len,
            self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
            sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype,
        )  # fmt: skip

    def graph_decode_wrapper(self, max_batch: int, max_blocks: int, device: torch.device):
        """A decode wrapper whose plan writes into fixed buffers, for one captured batch size."""
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            paged_kv_indptr_buffer=torch.zeros(max_batch + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=torch.zeros(max_batch * max_blocks, dtype=torch.int32, device=device),
            paged_kv_last_page_len_buffer=torch.zeros(max_batch, dtype=torch.int32, device=device),
        )

    def decode(self, q, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        wrapper = meta.plan if meta.plan is not None else self._decode  # a graph's own wrapper, if any
        return wrapper.run(q.contiguous(), kv_pool[:, layer_idx])

    def prefill(self, q, k, v, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        return self._prefill.run(q.contiguous(), kv_pool[:, layer_idx])


class FlashAttnAttention:
    """FlashAttention's `flash_attn_with_kvcache` over the pool's blocks (block size a multiple of 256)."""

    name = "flash_attn"
    supports_cuda_graphs = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        from flash_attn import flash_attn_with_kvcache

        self._attend = flash_attn_with_kvcache
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5

    def plan(self, meta: AttentionMetadata) -> object:
        return None

    def decode(self, q, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        out = self._attend(
            q.unsqueeze(1),  # (B, 1, H, D)
            kv_pool[:, layer_idx, 0],
            kv_pool[:, layer_idx, 1],
            cache_seqlens=meta.decode_seq_lens.to(torch.int32),
            block_table=meta.decode_block_tables.to(torch.int32),
            softmax_scale=self.scale,
            causal=True,
        )
        return out.squeeze(1)

    def prefill(self, q, k, v, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        for chunk in meta.prefills:
            start = chunk.query_start - meta.num_decode_tokens
            rows = slice(start, start + chunk.num_query_tokens)
            num_keys = chunk.num_context_tokens + chunk.num_query_tokens
            out[rows] = self._attend(
                q[rows].unsqueeze(0),  # (1, Q, H, D): causal aligns the queries with the last keys
                kv_pool[:, layer_idx, 0],
                kv_pool[:, layer_idx, 1],
                cache_seqlens=torch.tensor([num_keys], dtype=torch.int32, device=q.device),
                block_table=chunk.block_ids.to(torch.int32).unsqueeze(0),
                softmax_scale=self.scale,
                causal=True,
            )[0]
        return out
