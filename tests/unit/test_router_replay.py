"""Trace replay: trace loading, the simulated worker's cache and events, and a small replay's invariants."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import BlockRemoved, BlockStored, WorkerId
from triton_disagg.router.hashing import hash_block_tokens
from triton_disagg.tools.replay_trace import (
    CostModel,
    SimWorker,
    infinite_cache_hit_ratio,
    load_trace,
    simulate,
)

SHARED_TRACE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "synthetic_trace.jsonl"


def write_trace(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def row(timestamp_ms: int, hash_ids: list[int], output: int = 2) -> dict:
    return {
        "timestamp": timestamp_ms, "input_length": 512 * len(hash_ids), "output_length": output, "hash_ids": hash_ids,
    }


def test_trace_ids_become_chained_block_hashes(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [row(0, [0, 1]), row(1500, [0, 1, 2]), row(3000, [3])])
    requests = load_trace(trace, block_size=2, speedup=2.0)
    h0 = hash_block_tokens(None, [0, 1])
    h1 = hash_block_tokens(h0, [2, 3])
    assert requests[0].block_hashes == (h0, h1)
    assert requests[1].block_hashes == (h0, h1, hash_block_tokens(h1, [4, 5]))
    assert [r.arrival_s for r in requests] == [0.0, 0.75, 1.5]
    # 2 of 6 blocks were seen before.
    assert infinite_cache_hit_ratio(requests) == 2 / 6


def test_trace_with_unchained_ids_is_refused(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", [row(0, [0, 1]), row(1, [2, 1])])
    with pytest.raises(ValueError, match="hash id 1 follows 2, earlier 0"):
        load_trace(trace, block_size=2)


def test_sim_worker_caches_lru_tail_first_and_emits_engine_like_events():
    worker = SimWorker(WorkerId("w"), capacity_blocks=4, index=0)
    assert worker.access([1, 2, 3], block_size=16) == 0
    assert worker.pending_events == [BlockStored((1, 2, 3), None, (), 16)]
    worker.pending_events.clear()
    # Shares 1, 2; 5 and 6 are new; capacity 4 evicts the least recent: 3 (a tail).
    assert worker.access([1, 2, 5, 6], block_size=16) == 2
    assert worker.pending_events == [BlockStored((5, 6), 2, (), 16), BlockRemoved((3,))]
    assert list(worker.cache) == [6, 5, 2, 1]
    worker.pending_events.clear()
    # 7, 8 are new, evicting 6 then 5 (one event each); 1 is cached again after the miss on 7.
    assert worker.access([7, 8, 1], block_size=16) == 0
    assert worker.pending_events == [BlockStored((7, 8), None, (), 16), BlockRemoved((6,)), BlockRemoved((5,))]
    assert list(worker.cache) == [2, 1, 8, 7]


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason=f"shared trace not found at {SHARED_TRACE}")
def test_small_replay_kv_mode_beats_round_robin_and_respects_the_ceiling():
    requests = load_trace(SHARED_TRACE, block_size=16, limit=600)
    ceiling = infinite_cache_hit_ratio(requests)
    config = RouterConfig(block_size=16, seed=0)
    results = {
        mode: simulate(requests, mode, num_workers=4, capacity_blocks=2048, router_config=config,
                       cost=CostModel(), ceiling=ceiling)
        for mode in (RoutingMode.KV, RoutingMode.ROUND_ROBIN)
    }
    kv, round_robin = results[RoutingMode.KV], results[RoutingMode.ROUND_ROBIN]
    assert kv.hit_ratio > round_robin.hit_ratio
    assert kv.hit_ratio <= ceiling
    assert round_robin.requests_per_worker == [150, 150, 150, 150]
    assert sum(kv.requests_per_worker) == 600
    again = simulate(requests, RoutingMode.KV, 4, 2048, config, CostModel(), ceiling)
    assert replace(again, wall_s=0.0) == replace(kv, wall_s=0.0)  # deterministic for a seed
