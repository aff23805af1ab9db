"""Paged attention backends against attention over gathered KV: random block tables, ragged lengths, GQA.

Every backend that can run here (the CPU kernel and its plain-C build on the
CPU; FlashInfer / FlashAttention with TRITON_DISAGG_TEST_DEVICE=cuda) must
agree with a float64 reference computed from each sequence's blocks, and the
engine must produce the same greedy tokens with any of them.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch

from triton_disagg.engine.attention import AttentionMetadata, PrefillSlice
from triton_disagg.engine.attention_backends import CpuPagedAttention, DenseAttention, select_attention_backend
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.cpu_kernel import load_paged_attention
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams

DEVICE = torch.device(os.environ.get("TRITON_DISAGG_TEST_DEVICE", "cpu"))
NUM_LAYERS = 3


def make_pool(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn((num_blocks, NUM_LAYERS, 2, block_size, num_kv_heads, head_dim), generator=generator)
    return pool.to(DEVICE)


def random_tables(seq_lens: list[int], block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Disjoint, shuffled block ids per sequence (what a fragmented pool hands out)."""
    generator = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=generator).tolist()
    tables = []
    for length in seq_lens:
        count = -(-length // block_size)
        tables.append(free[:count])
        free = free[count:]
    return tables


def reference_attention(q, pool, layer, table: list[int], num_keys: int, first_query_pos: int) -> torch.Tensor:
    """float64 causal attention of queries at positions first_query_pos.. over the sequence's blocks."""
    num_heads, head_dim = q.shape[-2:]
    keys = pool[table, layer, 0].flatten(0, 1)[:num_keys].double()  # (S, KVH, D)
    values = pool[table, layer, 1].flatten(0, 1)[:num_keys].double()
    group = num_heads // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # (S, H, D)
    scores = torch.einsum("qhd,shd->hqs", q.double(), keys) * head_dim**-0.5
    q_pos = torch.arange(q.shape[0], device=q.device) + first_query_pos
    scores = scores.masked_fill(torch.arange(num_keys, device=q.device)[None, :] > q_pos[:, None], float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), values)


def decode_meta(tables: list[list[int]], seq_lens: list[int], backend) -> AttentionMetadata:
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], device=DEVICE)
    meta = AttentionMetadata(
        slot_block_ids=torch.zeros(0, dtype=torch.int64, device=DEVICE),
        slot_offsets=torch.zeros(0, dtype=torch.int64, device=DEVICE),
        num_decode_tokens=len(seq_lens),
        decode_block_tables=padded,
        decode_seq_lens=torch.tensor(seq_lens, device=DEVICE),
        prefills=[],
        backend=backend,
    )
    meta.plan = backend.plan(meta)
    return meta


def paged_backends(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> list:
    """Every in-place backend that runs on DEVICE for this shape."""
    if DEVICE.type == "cuda":
        backends = []
        for name in ("flashinfer", "flash_attn"):
            try:
                backends.append(select_attention_backend(name, DEVICE, torch.float32, num_heads, num_kv_heads, head_dim, block_size))
            except ValueError:
                pass
        return backends
    backends = [CpuPagedAttention(num_heads, num_kv_heads, head_dim, load_paged_attention())]
    if platform.machine() in ("x86_64", "AMD64"):  # the plain-C build, for CPUs without AVX2
        plain = load_paged_attention(("-mno-avx2", "-mno-fma"))
        assert plain is not None and not plain.is_simd
        backends.append(CpuPagedAttention(num_heads, num_kv_heads, head_dim, plain))
    return backends


SHAPES = [  # (num_heads, num_kv_heads, head_dim, block_size)
    (4, 2, 32, 16),  # the default model: GQA 2
    (8, 8, 64, 16),  # MHA
    (8, 1, 32, 8),  # MQA
    (6, 2, 24, 5),  # head_dim and block size off the SIMD widths: the scalar paths
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-kv{}-d{}-bs{}".format(*s))
def test_paged_decode_matches_reference_on_random_tables(shape):
    num_heads, num_kv_heads, head_dim, block_size = shape
    seq_lens = [1, block_size, block_size + 1, 3 * block_size - 1, 97, 2]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 7
    pool = make_pool(num_blocks, block_size, num_kv_heads, head_dim)
    tables = random_tables(seq_lens, block_size, num_blocks)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dtype = torch.float32
    for backend in [DenseAttention(num_heads, num_kv_heads, head_dim), *paged_backends(*shape)]:
        for layer in (0, NUM_LAYERS - 1):
            out = backend.decode(q.to(dtype), pool.to(dtype), layer, decode_meta(tables, seq_lens, backend))
            for b, (table, length) in enumerate(zip(tables, seq_lens)):
                expected = reference_attention(q[b : b + 1], pool, layer, table, length, length - 1)[0]
                torch.testing.assert_close(out[b].double(), expected, atol=2e-5, rtol=1e-4, msg=f"{backend.name} seq {b}")


@pytest.mark.parametrize("num_context_tokens", [0, 16, 37])
def test_prefill_chunk_matches_reference(num_context_tokens):
    num_heads, num_kv_heads, head_dim, block_size = 4, 2, 32, 16
    num_query = 21
    num_keys = num_context_tokens + num_query
    pool = make_pool(16, block_size, num_kv_heads, head_dim)
    table = random_tables([num_keys], block_size, 16)[0]
    q = torch.randn(num_query, num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    keys = pool[table, 1, 0].flatten(0, 1)[num_context_tokens:num_keys]  # the chunk's own K/V, as the layer passes them
    values = pool[table, 1, 1].flatten(0, 1)[num_context_tokens:num_keys]
    chunk = PrefillSlice(0, num_query, num_context_tokens, torch.tensor(table, device=DEVICE))
    expected = reference_attention(q, pool, 1, table, num_keys, num_context_tokens)
    for backend in [DenseAttention(num_heads, num_kv_heads, head_dim), *paged_backends(num_heads, num_kv_heads, head_dim, block_size)]:
        meta = AttentionMetadata(
            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), 0, None, None, [chunk], backend
        )
        meta.plan = backend.plan(meta)
        out = backend.prefill(q, keys, values, pool, 1, meta)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4, msg=backend.name)


def test_engine_tokens_identical_with_paged_and_dense_attention(tiny_model):
    """Greedy tokens through the whole engine: chunked prefill, a prefix-cache hit, ragged decode batches."""
    generator = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 256, (40,), generator=generator).tolist()
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in (3, 17, 150)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    def run(backend: str) -> list[list[int]]:
        engine = LLMEngine(
            EngineConfig(model_path=str(tiny_model), device=str(DEVICE), attention_backend=backend, max_num_batched_tokens=64)
        )
        assert engine.runner.attention.name != "dense" or backend == "dense"
        first = engine.generate(prompts + [shared + [1, 2, 3]], params)
        return first + engine.generate([shared + [4, 5]], params)  # hits the 32-token cached prefix

    assert run("auto") == run("dense")


def test_auto_picks_an_in_place_backend_on_cpu():
    backend = select_attention_backend("auto", torch.device("cpu"), torch.float32, 4, 2, 32, 16)
    assert backend.name == "cpu_paged"
    # bfloat16 has no CPU kernel: gathered KV, selected without an error.
    assert select_attention_backend("auto", torch.device("cpu"), torch.bfloat16, 4, 2, 32, 16).name == "dense"


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_the_kernel_runs_on_torchs_openmp_threads():
    # Threads of its own competed with torch's spinning OpenMP threads for the cores (1.6x slower in a
    # model step). Built with OpenMP, it must use the one libgomp the process has: torch's.
    kernel = load_paged_attention()
    assert kernel is not None and kernel.is_openmp
    # The kernel needs libgomp.so.1 by that name; other wheels may bring their own under hashed names.
    libraries = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith("/libgomp.so.1")}
    assert len(libraries) == 1 and "torch" in next(iter(libraries)), libraries


@pytest.mark.parametrize(
    "name, dtype, message",
    [
        ("flashinfer", torch.float32, "needs a CUDA device"),
        ("cpu_paged", torch.bfloat16, "float32"),
        ("paged", torch.float32, "is not one of"),
    ],
)
def test_unusable_backend_is_a_clear_setting_error(name, dtype, message):
    with pytest.raises(ValueError, match=message):
        select_attention_backend(name, torch.device("cpu"), dtype, 4, 2, 32, 16)
