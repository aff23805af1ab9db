"""The attention backends, and the choice among them.

| name         | device | decode reads the context                                   |
|--------------|--------|------------------------------------------------------------|
| `cpu_paged`  | CPU    | in place, by block table (C kernel, online softmax)        |
| `flashinfer` | CUDA   | in place (FlashInfer's paged decode/prefill kernels)       |
| `flash_attn` | CUDA   | in place (`flash_attn_with_kvcache(block_table=...)`)      |
| `dense`      | any    | gathered into a padded `(B, KVH, S, D)` copy, then SDPA    |

`auto` picks the first that runs here: FlashInfer, then FlashAttention on
CUDA, the C kernel on CPU (float32), and `dense` otherwise. Prefill chunks
without context attend over their own K/V as computed (no pool read); with a
cached or earlier-chunk context, the CPU backends copy that one sequence's
context once per layer (linear in its length, against the chunk's
quadratic compute) and the CUDA backends read it in place.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from triton_disagg.engine.attention import AttentionBackend, AttentionMetadata, PrefillSlice
from triton_disagg.engine.config import ATTENTION_BACKENDS

logger = logging.getLogger(__name__)


class _TorchPrefill:
    """Prefill attention with PyTorch SDPA, shared by the CPU and fallback backends."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.is_gqa = num_heads != num_kv_heads

    def plan(self, meta: AttentionMetadata) -> object:
        return None

    def prefill(self, q, k, v, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        if len(meta.prefills) == 1:
            return self.prefill_chunk(q, k, v, kv_pool, layer_idx, meta.prefills[0])
        out = torch.empty_like(q)
        for chunk in meta.prefills:
            rows = slice(chunk.query_start - meta.num_decode_tokens, chunk.query_start - meta.num_decode_tokens + chunk.num_query_tokens)
            out[rows] = self.prefill_chunk(q[rows], k[rows], v[rows], kv_pool, layer_idx, chunk)
        return out

    def prefill_chunk(self, q, k, v, kv_pool, layer_idx: int, chunk: PrefillSlice) -> torch.Tensor:
        """One chunk: `q` (Q, H, D) and its own `k`, `v` (Q, KVH, D); returns (Q, H, D)."""
        # 4-D inputs: CPU SDPA takes its fused kernel only for (B, H, S, D).
        query = q.transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
        if chunk.num_context_tokens == 0:  # the chunk is the whole context: its own K/V, no pool read
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # (1, KVH, Q, D)
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=self.scale, enable_gqa=self.is_gqa)
            return out[0].transpose(0, 1)
        num_keys = chunk.num_context_tokens + chunk.num_query_tokens
        keys = _gather_sequence(kv_pool, layer_idx, 0, chunk.block_ids, num_keys)  # (1, KVH, S, D)
        values = _gather_sequence(kv_pool, layer_idx, 1, chunk.block_ids, num_keys)
        # Query i sits at absolute position num_context_tokens + i.
        q_pos = torch.arange(chunk.num_query_tokens, device=q.device) + chunk.num_context_tokens
        mask = torch.arange(num_keys, device=q.device)[None, :] <= q_pos[:, None]  # (Q, S)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.is_gqa)
        return out[0].transpose(0, 1)  # (Q, H, D)


def _gather_sequence(kv_pool: torch.Tensor, layer_idx: int, kv: int, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One sequence's first `num_tokens` keys (kv=0) or values (kv=1) of a layer, `(1, KVH, S, D)`."""
    _, _, _, block_size, num_kv_heads, head_dim = kv_pool.shape
    blocks = kv_pool[:, layer_idx, kv].flatten(1)  # (N, BS*KVH*D), a view: one row per block
    rows = blocks.index_select(0, block_ids)  # (nb, BS*KVH*D)
    return rows.view(-1, num_kv_heads, head_dim)[:num_tokens].transpose(0, 1).unsqueeze(0)


class DenseAttention(_TorchPrefill):
    """Decode over a padded, gathered copy of every sequence's context: the reference, and the fallback."""

    name = "dense"
    supports_cuda_graphs = True

    def decode(self, q, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        tables = meta.decode_block_tables  # (B, W)
        keys = kv_pool[:, layer_idx, 0][tables].flatten(1, 2).transpose(1, 2)  # (B, KVH, W*BS, D)
        values = kv_pool[:, layer_idx, 1][tables].flatten(1, 2).transpose(1, 2)
        positions = torch.arange(keys.shape[2], device=q.device)
        mask = (positions[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.is_gqa
        )  # (B, H, 1, D)
        return out.squeeze(2)


class CpuPagedAttention(_TorchPrefill):
    """Decode read in place from the pool by the C kernel (`cpu_kernel.py`); float32 on CPU."""

    name = "cpu_paged"
    supports_cuda_graphs = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, kernel):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self.kernel = kernel

    def decode(self, q, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        return self.kernel.decode(
            q.contiguous(),
            kv_pool[:, layer_idx, 0],
            kv_pool[:, layer_idx, 1],
            meta.decode_block_tables,
            meta.decode_seq_lens,
            self.scale,
            torch.get_num_threads(),
        )


def select_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> AttentionBackend:
    """The backend `name` (one of ATTENTION_BACKENDS), or for "auto" the fastest that runs here.

    Raises ValueError naming the setting when a backend asked for by name cannot run.
    """
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend={name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    shape = (num_heads, num_kv_heads, head_dim)
    if device.type == "cuda" and name in ("auto", "flashinfer", "flash_attn"):
        from triton_disagg.engine.attention_cuda import cuda_backend

        backend, reason = cuda_backend(name, dtype, *shape, block_size)
        if backend is not None:
            return backend
        if name != "auto":
            raise ValueError(f"attention_backend={name!r} cannot run here: {reason}. Use 'auto' or 'dense'.")
        logger.warning("no paged CUDA attention kernel (%s): decode attends over gathered KV", reason)
    if name == "cpu_paged" or (name == "auto" and device.type == "cpu"):
        reason = _cpu_paged_unsupported(device, dtype)
        if reason is None:
            from triton_disagg.engine.cpu_kernel import load_paged_attention

            kernel = load_paged_attention()
            if kernel is not None:
                return CpuPagedAttention(*shape, kernel)
            reason = "the C kernel could not be built (see the warning above)"
        if name == "cpu_paged":
            raise ValueError(f"attention_backend='cpu_paged' cannot run here: {reason}. Use 'auto' or 'dense'.")
        logger.warning("CPU paged attention unavailable (%s): decode attends over gathered KV", reason)
    if name in ("flashinfer", "flash_attn"):
        raise ValueError(f"attention_backend={name!r} needs a CUDA device; this engine runs on {device}")
    return DenseAttention(*shape)


def _cpu_paged_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"it runs on CPU, not {device}"
    if dtype != torch.float32:
        return f"it computes in float32, not {dtype}"
    return None
