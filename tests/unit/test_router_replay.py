"""Trace replay: trace loading, the simulated worker's cache and events, and a small replay's invariants."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import BlockRemoved, BlockStored, Medium, WorkerId
from triton_disagg.router.hashing import hash_block_tokens
from triton_disagg.router.index import TierMatch
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
    assert worker.access([1, 2, 3], block_size=16) == TierMatch(0)
    assert worker.pending_events == [BlockStored((1, 2, 3), None, (), 16)]
    worker.pending_events.clear()
    # Shares 1, 2; 5 and 6 are new; capacity 4 evicts the least recent: 3 (a tail).
    assert worker.access([1, 2, 5, 6], block_size=16) == TierMatch(2)
    assert worker.pending_events == [BlockStored((5, 6), 2, (), 16), BlockRemoved((3,))]
    assert list(worker.cache) == [6, 5, 2, 1]
    worker.pending_events.clear()
    # 7, 8 are new, evicting 6 then 5 (one event each); 1 is cached again after the miss on 7.
    assert worker.access([7, 8, 1], block_size=16) == TierMatch(0)
    assert worker.pending_events == [BlockStored((7, 8), None, (), 16), BlockRemoved((6,)), BlockRemoved((5,))]
    assert list(worker.cache) == [2, 1, 8, 7]


def test_tiered_sim_worker_offloads_evictions_and_admits_to_disk_from_the_second_use():
    worker = SimWorker(WorkerId("w"), capacity_blocks=2, index=0, host_capacity_blocks=2, disk_capacity_blocks=4)
    worker.access([1, 2], block_size=16)
    worker.access([1, 2], block_size=16)  # 1 and 2 used twice
    worker.pending_events.clear()
    worker.access([3, 4], block_size=16)  # evicts 1, 2 from the device to host memory
    assert worker.pending_events == [
        BlockStored((3, 4), None, (), 16), BlockRemoved((2,)), BlockRemoved((1,)),
        BlockStored((2,), 1, (), 16, Medium.HOST), BlockStored((1,), None, (), 16, Medium.HOST),
    ]
    worker.pending_events.clear()
    worker.access([5, 6], block_size=16)  # 3, 4 to host memory; 2, 1 (used twice) on to disk
    assert list(worker.host) == [4, 3] and list(worker.disk) == [2, 1]
    assert BlockStored((1,), None, (), 16, Medium.DISK) in worker.pending_events
    worker.access([7, 8], block_size=16)  # 5, 6 to host memory; 4, 3 (used once) are dropped
    assert list(worker.disk) == [2, 1]
    # Leading blocks walk the tiers: 1, 2 on disk, then 5 in host memory; 9 is nowhere.
    assert worker.access([1, 2, 5, 9], block_size=16) == TierMatch(num_device=0, num_host=1, num_disk=2)


@pytest.mark.skipif(not SHARED_TRACE.is_file(), reason=f"shared trace not found at {SHARED_TRACE}")
def test_small_replay_with_tiers_finds_more_of_each_prompt_than_the_same_fleet_without():
    requests = load_trace(SHARED_TRACE, block_size=16, limit=600)
    ceiling = infinite_cache_hit_ratio(requests)
    config = RouterConfig(block_size=16, seed=0)
    plain = simulate(requests, RoutingMode.KV, 4, 512, config, CostModel(), ceiling)
    tiered = simulate(requests, RoutingMode.KV, 4, 512, config, CostModel(), ceiling,
                      host_capacity_blocks=1024, disk_capacity_blocks=4096)
    assert tiered.mode == "kv+tiers" and plain.host_hit_ratio == plain.disk_hit_ratio == 0.0
    assert tiered.hit_ratio > plain.hit_ratio and tiered.host_hit_ratio > 0
    assert tiered.hit_ratio == pytest.approx(tiered.device_hit_ratio + tiered.host_hit_ratio + tiered.disk_hit_ratio)
    assert tiered.hit_ratio <= ceiling


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
