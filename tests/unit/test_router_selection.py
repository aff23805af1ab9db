"""Worker selection: cost arithmetic, ties, softmax, busy thresholds, load tracking, modes, approx expiry."""

from __future__ import annotations

import math
import random

import pytest

from triton_disagg.router.approx import ApproxIndex
from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import BlockStored, Medium, WorkerId
from triton_disagg.router.hashing import hash_request_tokens
from triton_disagg.router.selection import (
    KvRouter,
    LoadTracker,
    NoWorkerAvailable,
    RouteRequest,
    WorkerLoad,
    WorkerMetrics,
    is_busy,
    pick_lowest_cost,
    softmax_weights,
    worker_costs,
)

BLOCK_SIZE = 4
A, B, C = WorkerId("a"), WorkerId("b"), WorkerId("c")
PROMPT = list(range(16))  # 4 blocks
H = tuple(hash_request_tokens(PROMPT, BLOCK_SIZE))


def make_router(*workers: WorkerId, **overrides) -> KvRouter:
    router = KvRouter(RouterConfig(**({"block_size": BLOCK_SIZE, "overlap_weight": 1.0, "seed": 0} | overrides)))
    router.sync_workers(workers)
    return router


def request(request_id: str = "r", hashes: tuple = H, num_tokens: int = 16, **overrides) -> RouteRequest:
    return RouteRequest(request_id, hashes, num_tokens, **overrides)


def load(
    worker_id: WorkerId, decode: int = 0, queued: int = 0, capacity: int | None = None, recent: float = 0.0
) -> WorkerLoad:
    return WorkerLoad(worker_id, decode, queued, capacity, recent)


@pytest.mark.parametrize("overlap_weight, costs", [(1.0, {A: 11.0, B: 8.0}), (2.0, {A: 12.0, B: 14.0})])
def test_costs_trade_overlap_against_load(overlap_weight, costs):
    """16-token prompt, block size 4. A holds 3 blocks and decodes 10 blocks:
    prefill (16 - 12) / 4 = 1 block, cost w*1 + 10. B holds nothing, has 8
    tokens queued and decodes 2: prefill (16 + 8) / 4 = 6 blocks, cost w*6 + 2."""
    loads = [load(A, decode=10), load(B, decode=2, queued=8)]
    assert worker_costs(16, {A: 3}, loads, overlap_weight, BLOCK_SIZE) == costs


def test_lowest_cost_wins_then_lower_load_then_seeded_random():
    loads = {A: load(A, decode=3), B: load(B, decode=1, queued=8), C: load(C, decode=2)}
    assert pick_lowest_cost({A: 4.0, B: 5.0, C: 6.0}, loads, BLOCK_SIZE, random.Random(0)) == (A, "lowest_cost")
    # A and C tie on cost; C carries 2 blocks of load against A's 3.
    assert pick_lowest_cost({A: 5.0, B: 6.0, C: 5.0}, loads, BLOCK_SIZE, random.Random(0)) == (C, "tie_lower_load")
    # A and B tie on cost and load (3 = 1 + 8/4): random, reproducible per seed, both reachable.
    picks = {pick_lowest_cost({A: 5.0, B: 5.0}, loads, BLOCK_SIZE, random.Random(seed)) for seed in range(20)}
    assert picks == {(A, "tie_random"), (B, "tie_random")}
    first = pick_lowest_cost({A: 5.0, B: 5.0}, loads, BLOCK_SIZE, random.Random(3))
    assert pick_lowest_cost({B: 5.0, A: 5.0}, loads, BLOCK_SIZE, random.Random(3)) == first


def test_equal_loads_tie_break_on_blocks_sent_recently():
    loads = {A: load(A, recent=8.0), B: load(B, recent=2.5), C: load(C, recent=2.5)}
    assert pick_lowest_cost({A: 5.0, B: 5.0}, loads, BLOCK_SIZE, random.Random(0)) == (B, "tie_less_recent")
    assert pick_lowest_cost({A: 5.0, B: 5.0, C: 5.0}, loads, BLOCK_SIZE, random.Random(0))[1] == "tie_random"


def test_blocks_sent_recently_decay_with_the_configured_time_constant():
    """4 blocks at t=0 and 4 at t=10 with a 10 s constant: at t=20, 4/e^2 + 4/e."""
    tracker = LoadTracker(load_decay_s=10.0)
    tracker.add_worker(A)
    tracker.add("r1", A, A, num_prefill_tokens=16, num_decode_blocks=4, now_s=0.0)
    tracker.add("r2", A, A, num_prefill_tokens=16, num_decode_blocks=4, now_s=10.0)
    assert tracker.load_of(A, now_s=10.0).recent_blocks == pytest.approx(4 / math.e + 4)
    assert tracker.load_of(A, now_s=20.0).recent_blocks == pytest.approx(4 / math.e**2 + 4 / math.e)
    with pytest.raises(ValueError, match="load_decay_s"):
        LoadTracker(load_decay_s=0)


def test_softmax_normalises_costs_to_unit_range():
    """Costs 0 and 10 normalise to 0 and 1: weights 1 and e^(-1/T)."""
    weights = softmax_weights({A: 0.0, B: 10.0}, temperature=1.0)
    assert weights[A] == pytest.approx(1 / (1 + math.exp(-1)))
    assert weights[B] == pytest.approx(math.exp(-1) / (1 + math.exp(-1)))
    assert softmax_weights({A: 3.0, B: 3.0}, temperature=0.5) == {A: 0.5, B: 0.5}
    with pytest.raises(ValueError, match="temperature"):
        softmax_weights({A: 1.0}, temperature=0)


def test_temperature_samples_in_proportion():
    router = make_router(A, B, temperature=0.05, seed=1)
    router.index.apply_event(A, BlockStored(H, None, (), BLOCK_SIZE))
    # Costs: A 0 (all cached), B 4; normalised 0 and 1 -> odds e^20 : 1.
    picks = [router.select(request(f"r{i}"), 0.0).worker_id for i in range(200)]
    assert picks.count(A) == 200
    router = make_router(A, B, temperature=100.0, seed=1)
    router.index.apply_event(A, BlockStored(H, None, (), BLOCK_SIZE))
    picks = [router.select(request(f"r{i}"), 0.0).worker_id for i in range(400)]
    assert 150 < picks.count(A) < 250  # nearly uniform
    assert router.select(request(), 0.0).reason == "sampled"


@pytest.mark.parametrize(
    "worker_load, busy",
    [
        (load(A, queued=10), False),
        (load(A, queued=11), True),
        (load(A, decode=50, capacity=100), False),
        (load(A, decode=51, capacity=100), True),
        (load(A, decode=10_000), False),  # capacity unknown: the usage threshold cannot apply
    ],
)
def test_busy_thresholds(worker_load, busy):
    config = RouterConfig(max_queued_prefill_tokens=10, max_decode_block_usage=0.5)
    assert is_busy(worker_load, config) is busy


def test_busy_workers_are_skipped_and_all_busy_is_an_error():
    router = make_router(A, B, max_queued_prefill_tokens=20)
    router.index.apply_event(A, BlockStored(H, None, (), BLOCK_SIZE))
    router.refresh_metrics(A, WorkerMetrics(active_decode_blocks=0, queued_prefill_tokens=21))
    decision = router.select(request(), 0.0)
    assert (decision.worker_id, decision.num_busy_skipped) == (B, 1)
    router.refresh_metrics(B, WorkerMetrics(active_decode_blocks=0, queued_prefill_tokens=30))
    with pytest.raises(NoWorkerAvailable) as info:
        router.select(request(), 0.0)
    assert info.value.reason == "all_workers_busy"
    with pytest.raises(NoWorkerAvailable, match="no_workers"):
        make_router().select(request(), 0.0)


def test_kv_mode_prefers_the_worker_holding_the_prefix():
    router = make_router(A, B, C)
    router.index.apply_event(B, BlockStored(H[:3], None, (), BLOCK_SIZE))
    decision = router.route(request(), 0.0)
    # B: (16 - 12) / 4 = 1 block to prefill; A and C: 4.
    assert (decision.worker_id, decision.overlap_blocks, decision.cost, decision.reason) == (B, 3, 1.0, "lowest_cost")


@pytest.mark.parametrize(
    "medium, weights, expected",
    [
        # B's 4 host blocks are worth 3 device blocks: cost 4 - 3 = 1 beats A's 4 - 2 = 2.
        (Medium.HOST, {"host_hit_weight": 0.75}, (B, 4, 1.0)),
        # B's 4 disk blocks are worth 1 device block: cost 3 loses to A's 2.
        (Medium.DISK, {"disk_hit_weight": 0.25}, (A, 2, 2.0)),
    ],
)
def test_lower_tier_blocks_are_credited_with_their_weights(medium, weights, expected):
    router = make_router(A, B, **weights)
    router.index.apply_event(A, BlockStored(H[:2], None, (), BLOCK_SIZE))
    router.index.apply_event(B, BlockStored(H, None, (), BLOCK_SIZE, medium))
    decision = router.route(request(), 0.0)
    assert (decision.worker_id, decision.overlap_blocks, decision.cost) == expected


def test_load_is_added_at_routing_prefill_removed_at_first_token_all_at_completion():
    router = make_router(A)
    router.index.apply_event(A, BlockStored(H[:1], None, (), BLOCK_SIZE))
    router.route(request("r1", num_tokens=18), 0.0)  # 18 tokens: 5 blocks, 4 cached tokens
    assert router.loads.load_of(A) == load(A, decode=5, queued=14, recent=5.0)
    router.on_first_token("r1")
    assert router.loads.load_of(A) == load(A, decode=5, queued=0, recent=5.0)
    router.on_first_token("r1")  # idempotent
    router.on_complete("r1")
    router.on_complete("r1")
    assert router.loads.load_of(A) == load(A, recent=5.0)  # history, not load
    assert router.loads.num_active_requests == 0


def test_reported_metrics_raise_the_load_but_never_hide_tracked_requests():
    tracker = LoadTracker()
    tracker.add_worker(A)
    tracker.add("r1", A, A, num_prefill_tokens=40, num_decode_blocks=10)
    tracker.refresh(A, WorkerMetrics(active_decode_blocks=25, queued_prefill_tokens=0, capacity_blocks=64))
    assert tracker.load_of(A) == load(A, decode=25, queued=40, capacity=64, recent=10.0)
    tracker.complete("r1")
    assert tracker.load_of(A) == load(A, decode=25, queued=0, capacity=64, recent=10.0)
    tracker.add("r2", A, A, 1, 1)
    with pytest.raises(ValueError, match="already routed"):
        tracker.add("r2", A, A, 1, 1)


def test_route_pair_counts_prefill_and_decode_on_their_own_workers():
    router = make_router(A, B, C)
    router.index.apply_event(B, BlockStored(H[:2], None, (), BLOCK_SIZE))
    pair = router.route_pair(request(), 0.0, prefill_worker_ids=[A], decode_worker_ids=[B, C])
    assert (pair.prefill.worker_id, pair.decode.worker_id) == (A, B)  # B holds 2 blocks, C none
    assert (pair.prefill.overlap_blocks, pair.decode.overlap_blocks) == (0, 2)
    assert router.loads.load_of(A) == load(A, queued=16)
    assert router.loads.load_of(B) == load(B, decode=4, recent=4.0)
    assert router.loads.load_of(C) == load(C)


def test_round_robin_cycles_and_random_is_seeded():
    router = make_router(A, B, C, mode=RoutingMode.ROUND_ROBIN)
    assert [router.route(request(f"r{i}"), 0.0).worker_id for i in range(4)] == [A, B, C, A]
    router = make_router(A, B, C, mode=RoutingMode.RANDOM, seed=5)
    first = [router.select(request(), 0.0).worker_id for _ in range(6)]
    router = make_router(A, B, C, mode=RoutingMode.RANDOM, seed=5)
    assert [router.select(request(), 0.0).worker_id for _ in range(6)] == first


def test_round_robin_takes_turns_per_pool():
    """A prefill choice between selects of the decode pool does not skip a decode worker's turn."""
    router = make_router(A, B, C, mode=RoutingMode.ROUND_ROBIN)
    decode_choices = []
    for i in range(4):
        router.select(request(f"r{i}"), 0.0, [C])  # the prefill pool: C alone
        decode_choices.append(router.select(request(f"r{i}"), 0.0, [A, B]).worker_id)
    assert decode_choices == [A, B, A, B]


def test_per_request_mode_overrides_the_configured_one():
    router = make_router(A, B, mode=RoutingMode.ROUND_ROBIN)
    router.index.apply_event(B, BlockStored(H, None, (), BLOCK_SIZE))
    assert router.select(request(mode=RoutingMode.KV), 0.0).worker_id == B
    assert router.select(request(), 0.0).mode is RoutingMode.ROUND_ROBIN


def test_approx_mode_learns_from_its_decisions_and_forgets_after_the_ttl():
    router = make_router(A, B, mode=RoutingMode.APPROX, approx_ttl_s=10.0)
    first = router.route(request("r1"), now_s=0.0)
    router.on_complete("r1")
    other = B if first.worker_id == A else A
    again = router.route(request("r2"), now_s=9.0)
    assert (again.worker_id, again.overlap_blocks) == (first.worker_id, 4)
    router.on_complete("r2")
    # Refreshed at 9.0: still known at 18.9, forgotten at 19.0.
    assert router.approx.find_matches(H, now_s=18.9) == {first.worker_id: 4}
    assert router.approx.find_matches(H, now_s=19.0) == {}
    assert router.approx.index.num_blocks(first.worker_id) == 0
    assert router.approx.index.num_blocks(other) == 0


def test_approx_index_expires_oldest_first_and_keeps_shared_heads():
    approx = ApproxIndex(ttl_s=5.0, max_blocks_per_worker=100)
    approx.add_worker(A)
    long = tuple(hash_request_tokens(list(range(24)), BLOCK_SIZE))  # 6 blocks, shares H's first 4
    approx.record(A, long, now_s=0.0)
    approx.record(A, H[:2], now_s=3.0)
    assert approx.expire(now_s=5.0) == 4  # blocks 2..5 of `long`, routed at 0.0
    assert approx.find_matches(long, now_s=5.0) == {A: 2}
    approx.index.check_integrity()


def test_worker_unload_drops_only_its_state():
    router = make_router(A, B)
    router.index.apply_event(A, BlockStored(H, None, (), BLOCK_SIZE))
    router.index.apply_event(B, BlockStored(H[:2], None, (), BLOCK_SIZE))
    assert router.route(request("r1"), 0.0).worker_id == A  # cost 0 (all cached) against B's 2
    # Approx knows nothing yet: A costs 4 + 4 decode blocks of r1, B costs 4.
    assert router.route(request("r2", mode=RoutingMode.APPROX), 0.0).worker_id == B
    assert router.sync_workers([B, C]) == ([C], [A])
    assert router.worker_ids == [B, C]
    assert router.index.find_matches(H) == {B: 2}
    assert router.approx.find_matches(H, 0.0) == {B: 4}
    assert router.loads.num_active_requests == 1  # r1 went with A
    assert router.loads.load_of(B) == load(B, decode=4, queued=16, recent=4.0)
    # B: (16 - 8) / 4 + 4 decode blocks = 6; C (new, empty): 4.
    decision = router.select(request("r3"), 0.0)
    assert (decision.worker_id, decision.cost) == (C, 4.0)
    with pytest.raises(KeyError):
        router.select(request(), 0.0, worker_ids=[A])


def test_config_from_strings_and_validation():
    config = RouterConfig.from_mapping(
        {"mode": "Approx", "overlap_weight": "2.5", "max_queued_prefill_tokens": "none", "seed": "", "x": "y"}
    )
    assert (config.mode, config.overlap_weight, config.max_queued_prefill_tokens, config.seed) == (
        RoutingMode.APPROX, 2.5, None, None,
    )
    with pytest.raises(ValueError, match="setting mode='fast' is not a valid RoutingMode"):
        RouterConfig.from_mapping({"mode": "fast"})
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        RouterConfig(temperature=-1)
    with pytest.raises(ValueError, match="max_decode_block_usage"):
        RouterConfig(max_decode_block_usage=1.5)


def test_config_from_environment(monkeypatch):
    monkeypatch.setenv("TRITON_DISAGG_ROUTER_MODE", "round_robin")
    monkeypatch.setenv("TRITON_DISAGG_ROUTER_BLOCK_SIZE", "32")
    config = RouterConfig.from_env()
    assert (config.mode, config.block_size) == (RoutingMode.ROUND_ROBIN, 32)


def test_requests_count_on_their_workers_from_route_to_complete():
    """What a drain waits for: r1 prefills on A and decodes on B, r2 runs on B alone, r3 on C alone.
    A request counts once on each distinct worker, from the route decision (before any
    token) past its first token, until `complete`; removing C forgets r3."""
    router = make_router(A, B, C)
    router.route_pair(request("r1"), 0.0, prefill_worker_ids=[A], decode_worker_ids=[B])
    router.route(request("r2"), 0.0, [B])
    router.route(request("r3"), 0.0, [C])
    assert [router.num_requests_on(w) for w in (A, B, C)] == [1, 2, 1]
    router.on_first_token("r1")
    assert [router.num_requests_on(w) for w in (A, B, C)] == [1, 2, 1]
    router.on_complete("r1")
    router.on_complete("r1")
    assert [router.num_requests_on(w) for w in (A, B, C)] == [0, 1, 1]
    router.sync_workers([A, B])
    router.on_complete("r2")
    assert [router.num_requests_on(w) for w in (A, B)] == [0, 0]
    with pytest.raises(KeyError, match="'c' is not known"):
        router.num_requests_on(C)


def test_removing_a_prefill_worker_uncounts_its_requests_on_the_decode_worker():
    router = make_router(A, B)
    router.route_pair(request("r1"), 0.0, prefill_worker_ids=[A], decode_worker_ids=[B])
    router.sync_workers([B])
    assert router.num_requests_on(B) == 0
    assert router.loads.num_active_requests == 0
