"""Replay a Mooncake trace against a simulated fleet and compare routing modes.

    python -m triton_disagg.tools.replay_trace [--trace ../shared/traces/synthetic_trace.jsonl] [--workers 8]
                                 [--capacity-blocks 4096] [--host-capacity-blocks 8192]
                                 [--disk-capacity-blocks 32768] [--modes kv,approx,round_robin,random]
                                 [--out results/replay_trace]

Each trace block (512 tokens, one hash id) becomes one KV block of the
model's `--block-size` tokens; its hash is computed by the engine's own
chained function over stand-in token ids, so equal trace prefixes give equal
block hashes. The router is the real `KvRouter`; in kv mode it is fed the
BlockStored/BlockRemoved events the simulated workers emit.

A simulated worker has a prefix cache of `--capacity-blocks` blocks with LRU
eviction (a request's tail blocks are evicted before its head, as in the
engine) and runs one step at a time: a step prefills the oldest waiting
prompt (if any) and decodes one token for every running request.

    prefill_s = prefill_base_s + prefill_s_per_token * uncached prompt tokens
    decode_s  = decode_base_s + decode_s_per_kv_token * tokens of the running requests

With lower tiers (`--host-capacity-blocks`, `--disk-capacity-blocks`; 0
turns one off) every mode also runs on the same fleet with tiered workers,
reported as "<mode>+tiers": a block evicted from the device cache goes to
the host tier (LRU), one evicted from there to the disk tier if it was used
at least twice, as in the engine. A prompt's leading blocks are looked up
device first, then host, then disk; lower-tier hits cost a copy instead of a
prefill:

    onboard_s = host_s_per_token * host-hit tokens + disk_s_per_token * disk-hit tokens

and the router, fed the workers' events with their media, credits them with
its `host_hit_weight` and `disk_hit_weight`.

Times and token counts in the cost model are the trace's (512-token blocks).
The default capacity, 4,096 blocks a worker, is 2M trace tokens: about
112 GiB of KV for a 7B model with grouped-query attention (28 layers, 4 KV
heads of 128, BF16: 56 KiB a token), what one 141 GB GPU holds next to the
weights, or an 80 GB GPU with a host-memory tier. Eight such workers hold
75% of the synthetic trace's 43,924 distinct blocks, so they evict.

Reported per mode: prefix hit ratio (prompt blocks found cached, in any
tier; the JSON splits it by tier) and its ratio to the infinite-cache ceiling (every block seen before is a hit), load
balance (each worker's active tokens sampled every second and averaged over
the run, max over mean; the JSON also has the mean of the per-sample
max/mean, which at this trace's low load mostly counts single requests), and
modelled time to first token. Prints a table, writes `<out>.json` and
`<out>.png`; progress goes to stderr. Every flag can also be set by an
environment variable `TRITON_DISAGG_REPLAY_<FLAG>` (e.g.
`TRITON_DISAGG_REPLAY_WORKERS=4`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.router.events import BlockRemoved, BlockStored, KVEvent, Medium, WorkerId
from triton_disagg.router.hashing import BlockHash, hash_block_tokens
from triton_disagg.router.index import TierMatch
from triton_disagg.router.selection import KvRouter, RouteRequest

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout: src/triton_disagg/tools/ is three levels down
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
#: Tokens a Mooncake trace hash id stands for.
TRACE_BLOCK_TOKENS = 512
ALL_MODES = (RoutingMode.KV, RoutingMode.APPROX, RoutingMode.ROUND_ROBIN, RoutingMode.RANDOM)


@dataclass(slots=True, frozen=True)
class TraceRequest:
    request_id: str
    arrival_s: float
    #: Trace tokens (512 per block).
    num_input_tokens: int
    num_output_tokens: int
    #: One chained hash per trace block.
    block_hashes: tuple[BlockHash, ...]


@dataclass(slots=True, frozen=True)
class CostModel:
    """Modelled step times of one worker, per trace token (an 8B model on one GPU, roughly).

    Onboarding: 56 KiB of KV a token (28 layers, 4 KV heads of 128, BF16) over
    PCIe at about 25 GB/s from host memory, read at about 5 GB/s from an NVMe disk.
    """

    prefill_base_s: float = 0.02
    prefill_s_per_token: float = 1 / 16_000
    decode_base_s: float = 0.012
    decode_s_per_kv_token: float = 2e-8
    host_s_per_token: float = 1 / 400_000
    disk_s_per_token: float = 1 / 80_000

    def prefill_s(self, num_uncached_tokens: int, num_host_tokens: int = 0, num_disk_tokens: int = 0) -> float:
        onboard_s = self.host_s_per_token * num_host_tokens + self.disk_s_per_token * num_disk_tokens
        return self.prefill_base_s + self.prefill_s_per_token * num_uncached_tokens + onboard_s

    def decode_s(self, num_kv_tokens: int) -> float:
        return self.decode_base_s + self.decode_s_per_kv_token * num_kv_tokens


@dataclass(slots=True)
class ModeResult:
    #: The routing mode, with "+tiers" when the workers have lower tiers.
    mode: str
    num_requests: int
    #: Prompt blocks found cached in any tier, over all prompt blocks.
    hit_ratio: float
    ceiling_ratio: float
    #: max over mean of the workers' time-averaged active tokens.
    load_max_over_mean: float
    #: mean over samples (fleet not idle) of max over mean of instantaneous active tokens.
    load_max_over_mean_instant: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p90_s: float
    requests_per_worker: list[int] = field(default_factory=list)
    mean_active_tokens_per_worker: list[float] = field(default_factory=list)
    #: The hit ratio split by where the blocks were found.
    device_hit_ratio: float = 0.0
    host_hit_ratio: float = 0.0
    disk_hit_ratio: float = 0.0
    wall_s: float = 0.0


# -- trace -----------------------------------------------------------------------


def load_trace(path: Path, block_size: int, limit: int | None = None, speedup: float = 1.0) -> list[TraceRequest]:
    """Requests of a Mooncake JSONL trace with block hashes at `block_size` tokens per trace block.

    Raises ValueError if the hash ids are not prefix-chained (an id seen
    after two different parents).
    """
    chain: dict[int, tuple[int | None, BlockHash]] = {}  # hash id -> (parent id, block hash)
    requests: list[TraceRequest] = []
    with path.open() as trace:
        for line_no, line in enumerate(trace):
            if limit is not None and line_no >= limit:
                break
            raw = json.loads(line)
            hashes: list[BlockHash] = []
            parent_id: int | None = None
            for hash_id in raw["hash_ids"]:
                known = chain.get(hash_id)
                if known is None:
                    tokens = range(hash_id * block_size, (hash_id + 1) * block_size)
                    known = (parent_id, hash_block_tokens(hashes[-1] if hashes else None, tokens))
                    chain[hash_id] = known
                elif known[0] != parent_id:
                    raise ValueError(f"{path}:{line_no + 1}: hash id {hash_id} follows {parent_id}, earlier {known[0]}")
                hashes.append(known[1])
                parent_id = hash_id
            requests.append(
                TraceRequest(
                    f"r{line_no}", raw["timestamp"] / 1000 / speedup, raw["input_length"],
                    max(raw["output_length"], 1), tuple(hashes),
                )
            )
    return requests


def infinite_cache_hit_ratio(requests: Sequence[TraceRequest]) -> float:
    """Leading blocks seen before (any request, any time) over all blocks: the ceiling of any router."""
    seen: set[BlockHash] = set()
    num_hits = num_blocks = 0
    for request in requests:
        hits = 0
        while hits < len(request.block_hashes) and request.block_hashes[hits] in seen:
            hits += 1
        num_hits += hits
        num_blocks += len(request.block_hashes)
        seen.update(request.block_hashes)
    return num_hits / num_blocks if num_blocks else 0.0


# -- simulated workers -----------------------------------------------------------


class SimWorker:
    """A worker's prefix cache (LRU over block hashes, optionally over host and disk tiers), queue and batch."""

    def __init__(
        self,
        worker_id: WorkerId,
        capacity_blocks: int,
        index: int,
        host_capacity_blocks: int = 0,
        disk_capacity_blocks: int = 0,
        disk_min_uses: int = 2,
    ):
        self.worker_id = worker_id
        self.index = index  # orders simultaneous steps
        self.capacity_blocks = capacity_blocks
        self.cache: OrderedDict[BlockHash, None] = OrderedDict()
        self.host_capacity_blocks = host_capacity_blocks
        self.disk_capacity_blocks = disk_capacity_blocks
        self.disk_min_uses = disk_min_uses
        self.host: OrderedDict[BlockHash, None] = OrderedDict()
        self.disk: OrderedDict[BlockHash, None] = OrderedDict()
        self.parents: dict[BlockHash, BlockHash | None] = {}
        self.uses: dict[BlockHash, int] = {}
        self.waiting: deque[TraceRequest] = deque()
        self.running: list[tuple[int, int, TraceRequest]] = []  # heap of (finish step, tiebreak, request)
        self.num_steps = 0  # decode steps done
        self.is_busy = False
        self.prefilling: TraceRequest | None = None
        self.pending_events: list[KVEvent] = []
        self.num_waiting_tokens = 0  # prompts waiting or prefilling
        self.num_running_prompt_tokens = 0
        self._sum_join_steps = 0

    @property
    def num_running_tokens(self) -> int:
        """KV tokens of the requests decoding (prompt and output so far)."""
        return self.num_running_prompt_tokens + len(self.running) * self.num_steps - self._sum_join_steps

    @property
    def num_active_tokens(self) -> int:
        """Tokens of every request routed here and not finished (waiting and prefilling prompts too)."""
        return self.num_waiting_tokens + self.num_running_tokens

    def access(self, block_hashes: Sequence[BlockHash], block_size: int) -> TierMatch:
        """Look up and then cache a prompt's blocks; returns its leading hits by tier and queues the KV events.

        Events are shaped as the engine's: a BlockStored per run of newly
        cached blocks, a BlockRemoved per evicted block, each with its medium.
        Lower-tier hits are brought back to the device (and stay in their tier).
        """
        cache, host, disk = self.cache, self.host, self.disk
        counts = [0, 0, 0]
        for block_hash in block_hashes:
            tier = 0 if block_hash in cache else 1 if block_hash in host else 2 if block_hash in disk else -1
            if tier < 0:
                break
            counts[tier] += 1
        for i, block_hash in enumerate(block_hashes):
            self.uses[block_hash] = self.uses.get(block_hash, 0) + 1
            self.parents.setdefault(block_hash, block_hashes[i - 1] if i else None)
        stored: list[list[BlockHash]] = []  # runs of newly cached blocks, in prefix order
        for i, block_hash in enumerate(block_hashes):
            if block_hash in cache:
                continue
            if stored and stored[-1][-1] == block_hashes[i - 1]:
                stored[-1].append(block_hash)
            else:
                stored.append([block_hash])
        for block_hash in reversed(block_hashes):  # tail first: the head is most recently used
            cache[block_hash] = None
            cache.move_to_end(block_hash)
        evicted: list[BlockHash] = []
        while len(cache) > self.capacity_blocks:
            evicted.append(cache.popitem(last=False)[0])
        position = {block_hash: i for i, block_hash in enumerate(block_hashes)}
        for run in stored:
            first = position[run[0]]
            parent = block_hashes[first - 1] if first else None
            self.pending_events.append(BlockStored(tuple(run), parent, (), block_size))
        # One event per evicted block, as the engine's block manager emits them.
        self.pending_events.extend(BlockRemoved((block_hash,)) for block_hash in evicted)
        for block_hash in evicted:
            self._offload(block_hash, block_size)
        return TierMatch(*counts)

    def _offload(self, block_hash: BlockHash, block_size: int) -> None:
        """A block evicted from the device goes to the host tier; one evicted from there to disk, if used twice."""
        if not self.host_capacity_blocks:
            return
        for demoted in self._admit(self.host, self.host_capacity_blocks, block_hash, Medium.HOST, block_size):
            if self.disk_capacity_blocks and self.uses[demoted] >= self.disk_min_uses:
                self._admit(self.disk, self.disk_capacity_blocks, demoted, Medium.DISK, block_size)

    def _admit(
        self, tier: OrderedDict[BlockHash, None], capacity: int, block_hash: BlockHash, medium: Medium, block_size: int
    ) -> list[BlockHash]:
        """Put a block in an LRU tier (refreshed if there); returns what it evicted. Queues the events."""
        if block_hash in tier:
            tier.move_to_end(block_hash)
            return []
        tier[block_hash] = None
        self.pending_events.append(BlockStored((block_hash,), self.parents[block_hash], (), block_size, medium))
        evicted: list[BlockHash] = []
        while len(tier) > capacity:
            evicted.append(tier.popitem(last=False)[0])
            self.pending_events.append(BlockRemoved((evicted[-1],), medium))
        return evicted

    def join_running(self, request: TraceRequest) -> None:
        """After prefill: the first token exists, the rest are decoded one per step."""
        finish_step = self.num_steps + request.num_output_tokens - 1
        heapq.heappush(self.running, (finish_step, id(request), request))
        self.num_running_prompt_tokens += request.num_input_tokens + 1
        self._sum_join_steps += self.num_steps

    def pop_finished(self) -> list[TraceRequest]:
        finished: list[TraceRequest] = []
        while self.running and self.running[0][0] <= self.num_steps:
            finish_step, _, request = heapq.heappop(self.running)
            self.num_running_prompt_tokens -= request.num_input_tokens + 1
            self._sum_join_steps -= finish_step - request.num_output_tokens + 1
            finished.append(request)
        return finished


# -- simulation ------------------------------------------------------------------


def simulate(
    requests: Sequence[TraceRequest],
    mode: RoutingMode,
    num_workers: int,
    capacity_blocks: int,
    router_config: RouterConfig,
    cost: CostModel,
    ceiling: float,
    sample_interval_s: float = 1.0,
    host_capacity_blocks: int = 0,
    disk_capacity_blocks: int = 0,
) -> ModeResult:
    """Run the fleet over `requests` with one routing mode; deterministic for a given seed.

    With `host_capacity_blocks` (and `disk_capacity_blocks`) the workers have lower tiers.
    """
    started_s = time.perf_counter()
    block_size = router_config.block_size
    router = KvRouter(RouterConfig(**{**_config_dict(router_config), "mode": mode}))
    workers = {
        WorkerId(f"worker_{i}"): SimWorker(
            WorkerId(f"worker_{i}"), capacity_blocks, i, host_capacity_blocks, disk_capacity_blocks
        )
        for i in range(num_workers)
    }
    router.sync_workers(workers)
    arrivals, steps, samples = 0, 1, 2  # event kinds, in tie order at equal times
    heap: list[tuple[float, int, int, object]] = [(r.arrival_s, arrivals, i, r) for i, r in enumerate(requests)]
    heapq.heapify(heap)
    end_s = requests[-1].arrival_s if requests else 0.0
    heapq.heappush(heap, (0.0, samples, 0, None))
    num_hits = num_blocks = 0
    tier_hits = [0, 0, 0]
    ttfts_s: list[float] = []
    active_sums = dict.fromkeys(workers, 0.0)
    instant_ratios: list[float] = []
    requests_per_worker = dict.fromkeys(workers, 0)
    num_done = num_samples = 0
    next_progress_s = time.perf_counter() + 0.5

    def start_step(worker: SimWorker, now_s: float) -> None:
        nonlocal num_hits, num_blocks
        duration_s = 0.0
        if worker.waiting:
            request = worker.waiting.popleft()
            hits = worker.access(request.block_hashes, block_size)
            num_hits += hits.num_blocks
            tier_hits[0] += hits.num_device
            tier_hits[1] += hits.num_host
            tier_hits[2] += hits.num_disk
            num_blocks += len(request.block_hashes)
            num_uncached = max(request.num_input_tokens - hits.num_blocks * TRACE_BLOCK_TOKENS, 0)
            duration_s += cost.prefill_s(
                num_uncached, hits.num_host * TRACE_BLOCK_TOKENS, hits.num_disk * TRACE_BLOCK_TOKENS
            )
            worker.prefilling = request
        if worker.running:
            duration_s += cost.decode_s(worker.num_running_tokens)
        worker.is_busy = duration_s > 0
        if worker.is_busy:
            heapq.heappush(heap, (now_s + duration_s, steps, worker.index, worker))

    while heap:
        now_s, kind, _, payload = heapq.heappop(heap)
        if kind == arrivals:
            request: TraceRequest = payload  # type: ignore[assignment]
            scaled_tokens = -(-request.num_input_tokens * block_size // TRACE_BLOCK_TOKENS)
            decision = router.route(RouteRequest(request.request_id, request.block_hashes, scaled_tokens), now_s)
            worker = workers[decision.worker_id]
            requests_per_worker[worker.worker_id] += 1
            worker.waiting.append(request)
            worker.num_waiting_tokens += request.num_input_tokens
            if not worker.is_busy:
                start_step(worker, now_s)
        elif kind == steps:
            worker = payload  # type: ignore[assignment]
            if worker.running:
                worker.num_steps += 1
            for request in worker.pop_finished():
                router.on_complete(request.request_id)
                num_done += 1
            if worker.prefilling is not None:
                request, worker.prefilling = worker.prefilling, None
                worker.num_waiting_tokens -= request.num_input_tokens
                if mode is RoutingMode.KV:
                    for event in worker.pending_events:
                        router.index.apply_event(worker.worker_id, event)
                worker.pending_events.clear()
                ttfts_s.append(now_s - request.arrival_s)
                router.on_first_token(request.request_id)
                if request.num_output_tokens > 1:
                    worker.join_running(request)
                else:
                    router.on_complete(request.request_id)
                    num_done += 1
            start_step(worker, now_s)
        else:
            loads = [worker.num_active_tokens for worker in workers.values()]
            num_samples += 1
            for worker_id, load in zip(workers, loads):
                active_sums[worker_id] += load
            if sum(loads):
                instant_ratios.append(max(loads) / (sum(loads) / len(loads)))
            if now_s + sample_interval_s <= end_s:
                heapq.heappush(heap, (now_s + sample_interval_s, samples, 0, None))
            if time.perf_counter() >= next_progress_s:
                _progress(f"{mode.value}: t={now_s:7.1f}/{end_s:.0f} s, {num_done}/{len(requests)} requests done")
                next_progress_s = time.perf_counter() + 0.5

    mean_active = statistics.fmean(active_sums.values())
    ttfts_s.sort()
    hit_ratio = num_hits / num_blocks if num_blocks else 0.0
    return ModeResult(
        mode=mode.value + ("+tiers" if host_capacity_blocks else ""),
        num_requests=len(requests),
        hit_ratio=hit_ratio,
        ceiling_ratio=hit_ratio / ceiling if ceiling else 0.0,
        load_max_over_mean=max(active_sums.values()) / mean_active if mean_active else 0.0,
        load_max_over_mean_instant=statistics.fmean(instant_ratios) if instant_ratios else 0.0,
        ttft_mean_s=statistics.fmean(ttfts_s) if ttfts_s else 0.0,
        ttft_p50_s=_percentile(ttfts_s, 0.5),
        ttft_p90_s=_percentile(ttfts_s, 0.9),
        requests_per_worker=list(requests_per_worker.values()),
        mean_active_tokens_per_worker=[total / max(num_samples, 1) for total in active_sums.values()],
        device_hit_ratio=tier_hits[0] / num_blocks if num_blocks else 0.0,
        host_hit_ratio=tier_hits[1] / num_blocks if num_blocks else 0.0,
        disk_hit_ratio=tier_hits[2] / num_blocks if num_blocks else 0.0,
        wall_s=time.perf_counter() - started_s,
    )


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)]


def _config_dict(config: RouterConfig) -> dict:
    return {name: getattr(config, name) for name in RouterConfig.__dataclass_fields__}


# -- report ----------------------------------------------------------------------


def format_table(results: Sequence[ModeResult], ceiling: float) -> str:
    header = (
        f"{'mode':<18} {'hit ratio':>9} {'device':>7} {'host':>6} {'disk':>6} {'of ceiling':>10} {'max/mean load':>13} "
        f"{'TTFT mean':>9} {'p50':>7} {'p90':>7}  (seconds; ceiling {ceiling:.1%})"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.mode:<18} {r.hit_ratio:>9.1%} {r.device_hit_ratio:>7.1%} {r.host_hit_ratio:>6.1%} "
            f"{r.disk_hit_ratio:>6.1%} {r.ceiling_ratio:>10.1%} {r.load_max_over_mean:>13.3f} "
            f"{r.ttft_mean_s:>9.3f} {r.ttft_p50_s:>7.3f} {r.ttft_p90_s:>7.3f}"
        )
    return "\n".join(lines)


def plot(results: Sequence[ModeResult], ceiling: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [r.mode for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(max(14, 1.6 * len(modes) * 3), 4))
    bottom = [0.0] * len(results)
    for tier, color in (("device", "tab:blue"), ("host", "tab:cyan"), ("disk", "tab:gray")):
        values = [getattr(r, f"{tier}_hit_ratio") for r in results]
        axes[0].bar(modes, values, bottom=bottom, color=color, label=f"{tier} hits")
        bottom = [b + v for b, v in zip(bottom, values)]
    axes[0].tick_params(axis="x", labelrotation=30)
    axes[1].tick_params(axis="x", labelrotation=30)
    axes[0].axhline(ceiling, color="black", linestyle="--", label=f"infinite cache {ceiling:.1%}")
    axes[0].axhline(0.9 * ceiling, color="gray", linestyle=":", label="90% of ceiling")
    axes[0].set_title("prefix hit ratio")
    axes[0].legend(loc="lower left")
    axes[1].bar(modes, [r.load_max_over_mean for r in results], color="tab:orange")
    axes[1].axhline(1.25, color="gray", linestyle=":", label="1.25")
    axes[1].set_title("load balance: max/mean active tokens")
    axes[1].legend(loc="lower left")
    x = range(len(modes))
    axes[2].bar([i - 0.2 for i in x], [r.ttft_p50_s for r in results], width=0.4, label="p50")
    axes[2].bar([i + 0.2 for i in x], [r.ttft_p90_s for r in results], width=0.4, label="p90")
    axes[2].set_xticks(list(x), modes)
    axes[2].set_title("modelled TTFT (s)")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _progress(message: str) -> None:
    print(f"[replay] {message}", file=sys.stderr, flush=True)


def _env(name: str, default: object) -> str:
    return os.environ.get(f"TRITON_DISAGG_REPLAY_{name.upper()}", str(default))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = RouterConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=Path(_env("trace", DEFAULT_TRACE)))
    parser.add_argument("--workers", type=int, default=int(_env("workers", 8)))
    parser.add_argument("--capacity-blocks", type=int, default=int(_env("capacity_blocks", 4096)),
                        help="prefix-cache capacity per worker, in blocks (one trace block each)")
    parser.add_argument("--host-capacity-blocks", type=int, default=int(_env("host_capacity_blocks", 8192)),
                        help="host tier per worker, in blocks; with tiers, every mode also runs on tiered workers (0: off)")
    parser.add_argument("--disk-capacity-blocks", type=int, default=int(_env("disk_capacity_blocks", 32768)),
                        help="disk tier per worker, in blocks (0: off)")
    parser.add_argument("--block-size", type=int, default=int(_env("block_size", defaults.block_size)))
    parser.add_argument("--modes", default=_env("modes", ",".join(m.value for m in ALL_MODES)))
    parser.add_argument("--limit", type=int, default=int(_env("limit", 0)) or None, help="first N requests only")
    parser.add_argument("--speedup", type=float, default=float(_env("speedup", 1.0)), help="time compression")
    parser.add_argument("--overlap-weight", type=float, default=float(_env("overlap_weight", defaults.overlap_weight)))
    parser.add_argument("--temperature", type=float, default=float(_env("temperature", defaults.temperature)))
    parser.add_argument("--load-decay-s", type=float, default=float(_env("load_decay_s", defaults.load_decay_s)))
    parser.add_argument("--approx-ttl-s", type=float, default=float(_env("approx_ttl_s", defaults.approx_ttl_s)))
    parser.add_argument("--seed", type=int, default=int(_env("seed", 0)))
    parser.add_argument("--out", type=Path, default=Path(_env("out", REPO_ROOT / "results" / "replay_trace")))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.trace.is_file():
        print(f"trace {args.trace} not found; pass --trace PATH to a Mooncake JSONL trace", file=sys.stderr)
        return 2
    modes = [RoutingMode(m.strip()) for m in args.modes.split(",") if m.strip()]
    _progress(f"loading {args.trace} (block size {args.block_size})")
    requests = load_trace(args.trace, args.block_size, args.limit, args.speedup)
    ceiling = infinite_cache_hit_ratio(requests)
    router_config = RouterConfig(
        block_size=args.block_size, overlap_weight=args.overlap_weight, temperature=args.temperature,
        load_decay_s=args.load_decay_s, approx_ttl_s=args.approx_ttl_s, seed=args.seed,
    )
    cost = CostModel()
    results = []
    tier_options = [(0, 0)] + ([(args.host_capacity_blocks, args.disk_capacity_blocks)] if args.host_capacity_blocks else [])
    for mode in modes:
        for host_blocks, disk_blocks in tier_options:
            _progress(f"{mode.value}: {len(requests)} requests on {args.workers} workers x {args.capacity_blocks} blocks"
                      + (f" + {host_blocks} host, {disk_blocks} disk" if host_blocks else ""))
            result = simulate(requests, mode, args.workers, args.capacity_blocks, router_config, cost, ceiling,
                              host_capacity_blocks=host_blocks, disk_capacity_blocks=disk_blocks)
            _progress(f"{result.mode}: hit ratio {result.hit_ratio:.1%} ({result.wall_s:.1f} s)")
            results.append(result)
    print(format_table(results, ceiling))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "trace": str(args.trace),
        "num_requests": len(requests),
        "workers": args.workers,
        "capacity_blocks_per_worker": args.capacity_blocks,
        "host_capacity_blocks_per_worker": args.host_capacity_blocks,
        "disk_capacity_blocks_per_worker": args.disk_capacity_blocks,
        "block_size": args.block_size,
        "speedup": args.speedup,
        "infinite_cache_hit_ratio": ceiling,
        "router_config": {
            k: (v.value if isinstance(v, RoutingMode) else v) for k, v in _config_dict(router_config).items()
        },
        "cost_model": asdict(cost),
        "results": [asdict(r) for r in results],
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    title = f"{args.trace.name}: {len(requests)} requests, {args.workers} workers x {args.capacity_blocks} blocks"
    plot(results, ceiling, args.out.with_suffix(".png"), title)
    _progress(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
