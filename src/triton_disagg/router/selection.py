"""Worker selection: a cost per worker from prefix overlap and load, and the routing modes.

Cost of sending a request to worker w, in KV blocks (lower is better):

    cost(w) = overlap_weight * prefill_blocks(w) + active_decode_blocks(w)
    prefill_blocks(w) = (prompt tokens - overlap(w) * block_size + queued_prefill_tokens(w)) / block_size

where overlap(w) credits each leading prompt block the worker holds by where
it holds it: 1 on the device, `host_hit_weight` in host memory,
`disk_hit_weight` on disk (bringing a block back is cheaper than computing
it, dearer than finding it on the device).

so a worker that holds more of the prompt, has less prefill queued and
fewer blocks decoding wins. Temperature 0 takes the lowest cost; ties go to
the lower load, then to the worker sent fewer blocks recently, then to a
seeded random pick. A positive temperature samples a softmax of the costs
normalised to [0, 1]. Workers over a busy threshold are skipped.

"Sent recently" is the decode blocks routed to a worker, decayed with time
constant `load_decay_s`. It matters when workers are idle, so their loads
tie at zero: sessions stick to the worker that holds their prefix, so the
worker given the most work lately is likely to get more of it.

The router tracks load itself: a routed request adds its uncached prompt
tokens to its prefill worker's queue and its blocks to its decode worker;
the first token removes the prefill part and completion the rest. Worker
metrics refresh it: the load used is the larger of the tracked and the last
reported value, so requests of other routers count too.

Everything here is pure decision logic: no clocks (times are passed in), no
I/O. Not thread-safe: callers serialise access (the subscriber's lock).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from triton_disagg.router.approx import ApproxIndex
from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import WorkerId
from triton_disagg.router.hashing import BlockHash
from triton_disagg.router.index import PrefixIndex, TierMatch
from triton_disagg.router.load import LoadTracker, WorkerLoad, WorkerMetrics


@dataclass(slots=True, frozen=True)
class RouteRequest:
    """What the router needs to know about a request."""

    request_id: str
    #: The prompt's block hash chain (`hash_request_tokens` with the router's block size).
    block_hashes: tuple[BlockHash, ...]
    num_prompt_tokens: int
    #: Overrides the configured mode for this request.
    mode: RoutingMode | None = None


@dataclass(slots=True, frozen=True)
class RouteDecision:
    """The chosen worker, with why."""

    worker_id: WorkerId
    #: Leading prompt blocks the chosen worker holds in any medium (as far as the router knows).
    overlap_blocks: int
    mode: RoutingMode
    #: "lowest_cost", "tie_lower_load", "tie_less_recent", "tie_random", "sampled",
    #: "round_robin" or "random".
    reason: str
    #: The chosen worker's cost, in blocks; None for modes without costs.
    cost: float | None
    num_busy_skipped: int = 0


@dataclass(slots=True, frozen=True)
class RoutePair:
    """A disaggregated route: where the prompt is prefilled and where it is decoded."""

    prefill: RouteDecision
    decode: RouteDecision


class NoWorkerAvailable(RuntimeError):
    """No candidate worker, or every candidate over a busy threshold; `reason` says which."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# -- cost ------------------------------------------------------------------------


def worker_costs(
    num_prompt_tokens: int,
    overlaps: Mapping[WorkerId, float],
    loads: Sequence[WorkerLoad],
    overlap_weight: float,
    block_size: int,
) -> dict[WorkerId, float]:
    """Cost of each worker in `loads` for a prompt (see the module docstring). O(workers).

    `overlaps` are each worker's credited prefix blocks (`TierMatch.credit`).
    """
    costs: dict[WorkerId, float] = {}
    for load in loads:
        num_uncached_tokens = max(num_prompt_tokens - overlaps.get(load.worker_id, 0) * block_size, 0)
        prefill_blocks = (num_uncached_tokens + load.queued_prefill_tokens) / block_size
        costs[load.worker_id] = overlap_weight * prefill_blocks + load.active_decode_blocks
    return costs


def pick_lowest_cost(
    costs: Mapping[WorkerId, float], loads: Mapping[WorkerId, WorkerLoad], block_size: int, rng: random.Random
) -> tuple[WorkerId, str]:
    """The cheapest worker and the reason: "lowest_cost", or for ties "tie_lower_load",
    "tie_less_recent" or "tie_random".

    Ties are exact cost equality; among them the lowest `num_load_blocks`
    wins, then the lowest `recent_blocks`, and what is still tied is broken
    by `rng` over the ids in sorted order (so a seed reproduces the choice).
    Raises ValueError on no costs.
    """
    if not costs:
        raise ValueError("no worker costs to pick from")
    best = min(costs.values())
    tied = sorted(worker_id for worker_id, cost in costs.items() if cost == best)
    if len(tied) == 1:
        return tied[0], "lowest_cost"
    for reason, key in (
        ("tie_lower_load", lambda w: loads[w].num_load_blocks(block_size)),
        ("tie_less_recent", lambda w: loads[w].recent_blocks),
    ):
        lowest = min(key(worker_id) for worker_id in tied)
        tied = [worker_id for worker_id in tied if key(worker_id) == lowest]
        if len(tied) == 1:
            return tied[0], reason
    return rng.choice(tied), "tie_random"


def softmax_weights(costs: Mapping[WorkerId, float], temperature: float) -> dict[WorkerId, float]:
    """Selection probabilities: softmax of -normalised cost / temperature (costs scaled to [0, 1])."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
    lowest, highest = min(costs.values()), max(costs.values())
    span = highest - lowest or 1.0
    weights = {w: math.exp(-(cost - lowest) / span / temperature) for w, cost in costs.items()}
    total = sum(weights.values())
    return {w: weight / total for w, weight in weights.items()}


def is_busy(load: WorkerLoad, config: RouterConfig) -> bool:
    """Whether a worker is over one of the configured busy thresholds."""
    if config.max_queued_prefill_tokens is not None and load.queued_prefill_tokens > config.max_queued_prefill_tokens:
        return True
    if config.max_decode_block_usage is not None and load.capacity_blocks:
        return load.active_decode_blocks > config.max_decode_block_usage * load.capacity_blocks
    return False


# -- modes -----------------------------------------------------------------------


class WorkerSelector(Protocol):
    """One routing mode. `loads` are the candidates, none busy, at least one."""

    mode: RoutingMode

    def select(self, request: RouteRequest, loads: Sequence[WorkerLoad], now_s: float) -> RouteDecision:
        """Pick one of `loads`' workers. May advance internal state (RNG, counter)."""
        ...

    def on_routed(self, request: RouteRequest, worker_id: WorkerId, now_s: float) -> None:
        """The request was sent to `worker_id` (a mode may learn from it)."""
        ...


class _CostSelector:
    """Shared by kv and approx: costs from overlaps, then lowest cost or softmax sample."""

    mode: RoutingMode

    def __init__(self, config: RouterConfig, rng: random.Random):
        self.config = config
        self.rng = rng

    def matches(self, request: RouteRequest, now_s: float) -> dict[WorkerId, TierMatch]:
        raise NotImplementedError

    def select(self, request: RouteRequest, loads: Sequence[WorkerLoad], now_s: float) -> RouteDecision:
        matches = self.matches(request, now_s)
        config = self.config
        credits = {
            worker_id: match.credit(config.host_hit_weight, config.disk_hit_weight)
            for worker_id, match in matches.items()
        }
        costs = worker_costs(request.num_prompt_tokens, credits, loads, config.overlap_weight, config.block_size)
        if config.temperature > 0:
            weights = softmax_weights(costs, config.temperature)
            worker_id = self.rng.choices(list(weights), list(weights.values()))[0]
            reason = "sampled"
        else:
            by_id = {load.worker_id: load for load in loads}
            worker_id, reason = pick_lowest_cost(costs, by_id, config.block_size, self.rng)
        match = matches.get(worker_id)
        return RouteDecision(worker_id, match.num_blocks if match else 0, self.mode, reason, costs[worker_id])

    def on_routed(self, request: RouteRequest, worker_id: WorkerId, now_s: float) -> None:
        pass


class KvSelector(_CostSelector):
    """Overlap from the KV-event index, by the medium each worker holds each block in."""

    mode = RoutingMode.KV

    def __init__(self, config: RouterConfig, rng: random.Random, index: PrefixIndex):
        super().__init__(config, rng)
        self.index = index

    def matches(self, request: RouteRequest, now_s: float) -> dict[WorkerId, TierMatch]:
        return self.index.find_tiered_matches(request.block_hashes)


class ApproxSelector(_CostSelector):
    """Overlap from the router's own past decisions, which expire after `approx_ttl_s`."""

    mode = RoutingMode.APPROX

    def __init__(self, config: RouterConfig, rng: random.Random, index: ApproxIndex):
        super().__init__(config, rng)
        self.index = index

    def matches(self, request: RouteRequest, now_s: float) -> dict[WorkerId, TierMatch]:
        return {w: TierMatch(n) for w, n in self.index.find_matches(request.block_hashes, now_s).items()}

    def on_routed(self, request: RouteRequest, worker_id: WorkerId, now_s: float) -> None:
        self.index.record(worker_id, request.block_hashes, now_s)


class RoundRobinSelector:
    """Takes turns within each candidate set: choosing a prefill worker does not advance the decode
    pool's turn (one counter per set, so with two decode workers requests alternate between them)."""

    mode = RoutingMode.ROUND_ROBIN

    def __init__(self) -> None:
        self._next: dict[tuple[WorkerId, ...], int] = {}

    def select(self, request: RouteRequest, loads: Sequence[WorkerLoad], now_s: float) -> RouteDecision:
        candidates = tuple(load.worker_id for load in loads)
        turn = self._next.get(candidates, 0)
        self._next[candidates] = turn + 1
        return RouteDecision(loads[turn % len(loads)].worker_id, 0, self.mode, "round_robin", None)

    def on_routed(self, request: RouteRequest, worker_id: WorkerId, now_s: float) -> None:
        pass


class RandomSelector:
    mode = RoutingMode.RANDOM

    def __init__(self, rng: random.Random):
        self.rng = rng

    def select(self, request: RouteRequest, loads: Sequence[WorkerLoad], now_s: float) -> RouteDecision:
        return RouteDecision(self.rng.choice(loads).worker_id, 0, self.mode, "random", None)

    def on_routed(self, request: RouteRequest, worker_id: WorkerId, now_s: float) -> None:
        pass


# -- the router ------------------------------------------------------------------


class KvRouter:
    """All routing modes over one set of workers, with the router's own load tracking.

    `index` is the KV-event index (shared with the event subscriber, which
    fills it). Workers come and go through `sync_workers` (Triton's
    repository index is the registry); the state of the others survives.
    """

    def __init__(self, config: RouterConfig, index: PrefixIndex | None = None):
        self.config = config
        self.index = index if index is not None else PrefixIndex(config.max_blocks_per_worker)
        self.approx = ApproxIndex(config.approx_ttl_s, config.max_blocks_per_worker)
        self.loads = LoadTracker(config.load_decay_s)
        self._rng = random.Random(config.seed)
        self._worker_ids: dict[WorkerId, None] = {}  # registration order
        self.selectors: dict[RoutingMode, WorkerSelector] = {
            RoutingMode.KV: KvSelector(config, self._rng, self.index),
            RoutingMode.APPROX: ApproxSelector(config, self._rng, self.approx),
            RoutingMode.ROUND_ROBIN: RoundRobinSelector(),
            RoutingMode.RANDOM: RandomSelector(self._rng),
        }

    @property
    def worker_ids(self) -> list[WorkerId]:
        return list(self._worker_ids)

    def add_worker(self, worker_id: WorkerId) -> None:
        """Register a worker (idempotent)."""
        self._worker_ids[worker_id] = None
        self.index.add_worker(worker_id)
        self.approx.add_worker(worker_id)
        self.loads.add_worker(worker_id)

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Drop a worker from every index and its requests from the load (idempotent)."""
        self._worker_ids.pop(worker_id, None)
        self.index.remove_worker(worker_id)
        self.approx.remove_worker(worker_id)
        self.loads.remove_worker(worker_id)

    def sync_workers(self, live_worker_ids: Iterable[WorkerId]) -> tuple[list[WorkerId], list[WorkerId]]:
        """Make the registered workers equal `live_worker_ids`; returns (added, removed)."""
        live = dict.fromkeys(live_worker_ids)
        removed = [worker_id for worker_id in self._worker_ids if worker_id not in live]
        added = [worker_id for worker_id in live if worker_id not in self._worker_ids]
        for worker_id in removed:
            self.remove_worker(worker_id)
        for worker_id in added:
            self.add_worker(worker_id)
        return added, removed

    def select(
        self, request: RouteRequest, now_s: float, worker_ids: Iterable[WorkerId] | None = None
    ) -> RouteDecision:
        """Choose a worker among `worker_ids` (default: all registered) without recording anything.

        Raises NoWorkerAvailable ("no_workers" or "all_workers_busy"), and
        KeyError for a candidate that is not registered.
        """
        candidates = self.worker_ids if worker_ids is None else list(worker_ids)
        if not candidates:
            raise NoWorkerAvailable("no_workers", "no worker is registered; load a prefill or decode model")
        loads = [self.loads.load_of(worker_id, now_s) for worker_id in candidates]
        free = [load for load in loads if not is_busy(load, self.config)]
        if not free:
            raise NoWorkerAvailable("all_workers_busy", f"all {len(loads)} workers are over a busy threshold")
        decision = self.selectors[request.mode or self.config.mode].select(request, free, now_s)
        if len(free) < len(loads):
            decision = _with_busy_skipped(decision, len(loads) - len(free))
        return decision

    def route(
        self, request: RouteRequest, now_s: float, worker_ids: Iterable[WorkerId] | None = None
    ) -> RouteDecision:
        """`select`, then count the request on the chosen worker (prefill and decode there)."""
        decision = self.select(request, now_s, worker_ids)
        self.record(request, decision, decision, now_s)
        return decision

    def route_pair(
        self,
        request: RouteRequest,
        now_s: float,
        prefill_worker_ids: Iterable[WorkerId],
        decode_worker_ids: Iterable[WorkerId],
    ) -> RoutePair:
        """Choose a prefill worker and a decode worker, and count the request on both."""
        prefill = self.select(request, now_s, prefill_worker_ids)
        decode = self.select(request, now_s, decode_worker_ids)
        self.record(request, prefill, decode, now_s)
        return RoutePair(prefill, decode)

    def on_first_token(self, request_id: str) -> None:
        self.loads.prefill_done(request_id)

    def on_complete(self, request_id: str) -> None:
        self.loads.complete(request_id)

    def num_requests_on(self, worker_id: WorkerId) -> int:
        """Requests routed to `worker_id` (as prefill or decode worker) and not complete; KeyError if unknown."""
        return self.loads.num_requests_on(worker_id)

    def refresh_metrics(self, worker_id: WorkerId, metrics: WorkerMetrics) -> None:
        self.loads.refresh(worker_id, metrics)

    def record(self, request: RouteRequest, prefill: RouteDecision, decode: RouteDecision, now_s: float) -> None:
        """Count a request on the workers `select` chose (what `route_pair` does after selecting)."""
        block_size = self.config.block_size
        num_uncached_tokens = max(request.num_prompt_tokens - prefill.overlap_blocks * block_size, 0)
        num_blocks = -(-request.num_prompt_tokens // block_size)
        self.loads.add(
            request.request_id, prefill.worker_id, decode.worker_id, num_uncached_tokens, num_blocks, now_s
        )
        selector = self.selectors[request.mode or self.config.mode]
        selector.on_routed(request, prefill.worker_id, now_s)
        if decode.worker_id != prefill.worker_id:
            selector.on_routed(request, decode.worker_id, now_s)


def _with_busy_skipped(decision: RouteDecision, num_busy_skipped: int) -> RouteDecision:
    return RouteDecision(
        decision.worker_id, decision.overlap_blocks, decision.mode, decision.reason, decision.cost, num_busy_skipped
    )
