"""Engine-side measurements of `bench perf`: the paged decode step, and TTFT with a cached prefix.

Both compare two things side by side in one process, interleaving their
repeats so that load from other processes on a shared machine hits both alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.attention import AttentionMetadata
from triton_disagg.engine.attention_backends import DenseAttention, select_attention_backend
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.loader import load_model
from triton_disagg.engine.params import SamplingParams


class ContiguousKV(DenseAttention):
    """Decode over K/V already laid out contiguously per sequence: the yardstick paged attention is held to.

    `snapshot` copies a fixed batch's context out of the pool once; `decode`
    then runs SDPA on those copies (query heads of a KV group folded into the
    query length, SDPA's fastest form for one token), never reading the pool.
    """

    name = "contiguous"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def snapshot(self, kv_pool: torch.Tensor, block_tables: torch.Tensor, seq_len: int) -> None:
        for layer in range(kv_pool.shape[1]):
            for kv, store in ((0, self._keys), (1, self._values)):
                blocks = kv_pool[:, layer, kv][block_tables].flatten(1, 2)[:, :seq_len]  # (B, S, KVH, D)
                store.append(blocks.transpose(1, 2).contiguous())  # (B, KVH, S, D)

    def decode(self, q, kv_pool, layer_idx: int, meta: AttentionMetadata) -> torch.Tensor:
        num_seqs = q.shape[0]
        query = q.reshape(num_seqs, self.num_kv_heads, -1, self.head_dim)  # (B, KVH, G, D)
        out = F.scaled_dot_product_attention(query, self._keys[layer_idx], self._values[layer_idx], scale=self.scale)
        return out.reshape(num_seqs, self.num_heads, self.head_dim)


def _time_ms(fn: Callable[[], object], sync: Callable[[], None]) -> tuple[float, float]:
    """(wall ms, CPU ms of this process) of one call. CPU time counts the work whatever else runs."""
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3, (time.process_time() - start_cpu) * 1e3


def bench_decode_step(
    model_path: str, device: str, num_seqs: int, context_tokens: int, block_size: int, repeats: int, progress
) -> dict:
    """One decode step of `num_seqs` sequences of `context_tokens` each, paged against contiguous KV.

    The pool holds random K/V in shuffled blocks (a fragmented pool); the same
    batch runs through the whole model with each backend, and each backend's
    attention of one layer is timed alone too. Best (least disturbed) of
    `repeats` interleaved runs, in wall time and in CPU time.
    """
    torch_device = torch.device(device)
    dtype = EngineConfig(model_path=model_path).resolve_dtype(torch_device)
    model = load_model(model_path, torch_device, dtype)
    config = model.config
    blocks_per_seq = -(-context_tokens // block_size)
    num_blocks = num_seqs * blocks_per_seq + 1
    shape = (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    pool = torch.randn(
        (num_blocks, config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim),
        generator=torch.Generator().manual_seed(0),
    ).to(torch_device, dtype)
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1))[: num_seqs * blocks_per_seq]
    tables = order.view(num_seqs, blocks_per_seq).to(torch_device)
    last = context_tokens - 1  # each sequence's new token sits at position context_tokens - 1
    meta = AttentionMetadata(
        slot_block_ids=tables[:, last // block_size].contiguous(),
        slot_offsets=torch.full((num_seqs,), last % block_size, device=torch_device),
        num_decode_tokens=num_seqs,
        decode_block_tables=tables,
        decode_seq_lens=torch.full((num_seqs,), context_tokens, device=torch_device),
        prefills=[],
    )
    input_ids = torch.randint(0, config.vocab_size, (num_seqs,), generator=torch.Generator().manual_seed(2)).to(torch_device)
    positions = torch.full((num_seqs,), last, device=torch_device)
    logits_indices = torch.arange(num_seqs, device=torch_device)
    paged = select_attention_backend("auto", torch_device, dtype, *shape, block_size)
    dense = DenseAttention(*shape)
    contiguous = ContiguousKV(*shape)

    def step(backend):
        meta.backend = backend
        meta.plan = backend.plan(meta)
        return model(input_ids, positions, pool, meta, logits_indices)

    reference = step(dense)  # writes the new token's K/V, so the snapshot holds the whole context
    contiguous.snapshot(pool, tables, context_tokens)
    sync = torch.cuda.synchronize if torch_device.type == "cuda" else (lambda: None)
    q = torch.randn((num_seqs, *shape[:1], shape[2]), generator=torch.Generator().manual_seed(3)).to(torch_device, dtype)
    backends = {"paged": paged, "contiguous": contiguous, "dense": dense}
    step_ms: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    attention_ms: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    agree = {}
    for name, backend in backends.items():  # warm-up, and a check that all three compute the same step
        agree[name] = bool(torch.allclose(step(backend), reference, atol=1e-3, rtol=1e-3))
    for rep in range(repeats):
        for name, backend in backends.items():
            step_ms[name].append(_time_ms(lambda: step(backend), sync))
            meta.backend, meta.plan = backend, backend.plan(meta)
            attention_ms[name].append(_time_ms(lambda: backend.decode(q, pool, 0, meta), sync))
        progress(
            f"decode step {num_seqs}x{context_tokens} [{rep + 1}/{repeats}]: "
            + ", ".join(f"{name} {times[-1][0]:.1f} ms" for name, times in step_ms.items())
        )
    best = {name: min(t[0] for t in times) for name, times in step_ms.items()}
    best_cpu = {name: min(t[1] for t in times) for name, times in step_ms.items()}
    attention = {name: min(t[0] for t in times) for name, times in attention_ms.items()}
    attention_cpu = {name: min(t[1] for t in times) for name, times in attention_ms.items()}
    return {
        "num_seqs": num_seqs,
        "context_tokens": context_tokens,
        "block_size": block_size,
        "paged_backend": paged.name,
        "step_ms": best,
        "step_cpu_ms": best_cpu,
        "attention_ms_one_layer": attention,
        "attention_cpu_ms_one_layer": attention_cpu,
        "paged_over_contiguous": best["paged"] / best["contiguous"],
        "dense_over_contiguous": best["dense"] / best["contiguous"],
        "cpu_paged_over_contiguous": best_cpu["paged"] / best_cpu["contiguous"],
        "attention_paged_over_contiguous": attention["paged"] / attention["contiguous"],
        "same_logits": agree,
        "repeats": repeats,
    }


def bench_cached_prefix(
    model_path: str, device: str, prompt_tokens: int, cached_fraction: float, repeats: int, progress
) -> dict:
    """Time to first token of a prompt whose leading `cached_fraction` is in the prefix cache, against cold.

    Engine alone (its own thread, as a worker runs it). Each repeat sends a
    fresh random prompt (cold: nothing cached), then a prompt sharing its first
    `cached_fraction` of tokens with a different tail. Medians.
    """
    engine = LLMEngine(EngineConfig(model_path=model_path, device=device))
    thread = EngineThread(engine)
    thread.start()
    num_shared = int(prompt_tokens * cached_fraction)
    generator = torch.Generator().manual_seed(4)
    cold_ms, cached_ms, cached_tokens = [], [], []
    try:
        for rep in range(repeats + 1):  # the first round warms up
            prompt = torch.randint(0, 256, (prompt_tokens,), generator=generator).tolist()
            tail = torch.randint(0, 256, (prompt_tokens - num_shared,), generator=generator).tolist()
            cold, _ = _first_token_ms(thread, f"cold-{rep}", prompt)
            cached, num_cached = _first_token_ms(thread, f"cached-{rep}", prompt[:num_shared] + tail)
            if rep:
                cold_ms.append(cold)
                cached_ms.append(cached)
                cached_tokens.append(num_cached)
                progress(f"cached prefix [{rep}/{repeats}]: cold {cold:.1f} ms, {num_cached} tokens cached {cached:.1f} ms")
    finally:
        thread.stop()
    cold, cached = statistics.median(cold_ms), statistics.median(cached_ms)
    return {
        "prompt_tokens": prompt_tokens,
        "cached_fraction": cached_fraction,
        "cached_tokens": min(cached_tokens),
        "cold_ttft_ms": cold,
        "cached_ttft_ms": cached,
        "cached_ttft_ratio": cached / cold,
        "computed_fraction": 1 - min(cached_tokens) / prompt_tokens,
        "repeats": repeats,
    }


def _first_token_ms(thread: EngineThread, request_id: str, prompt: list[int]) -> tuple[float, int]:
    done = threading.Event()
    result: list = []

    def on_output(output):
        if not result:
            result.append((time.perf_counter(), output.num_cached_tokens))
        if output.finished:
            done.set()

    start = time.perf_counter()
    thread.submit(request_id, prompt, SamplingParams(max_tokens=1), on_output, lambda exc: done.set())
    if not done.wait(300) or not result:
        raise RuntimeError(f"request {request_id} produced no token")
    return (result[0][0] - start) * 1e3, result[0][1]
