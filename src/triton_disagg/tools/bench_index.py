"""Peer benchmark of the prefix index against Dynamo's Rust RadixTree (Python binding).

    pip install -e '.[bench]'     # ai-dynamo-runtime: dynamo._core.RadixTree
    python -m triton_disagg.tools.bench_index [--trace ../shared/traces/synthetic_trace.jsonl] [--workers 8]
                                [--capacity-blocks 4096] [--repeats 3] [--out results/bench_index]

One run builds both indexes from the same event stream and queries both with
the same requests, alternating which goes first:

1. Events: the trace is routed (kv mode) over simulated workers with finite
   LRU caches (as in `tools.replay_trace`), which emit BlockStored and
   BlockRemoved events; each event is encoded once per wire format, one event
   per message: ours as a msgpack `EventBatch`, Dynamo's as its JSON
   `{"event_id", "data": {"stored": {"parent_hash", "blocks": [{"block_hash",
   "tokens_hash"}]}}}` (tokens_hash = block_hash, both the chained hash).
2. Apply: events/s from bytes to index. Ours: `decode_batch` +
   `PrefixIndex.apply_event`; also shown, the index alone on decoded events
   and the full router path with sequence checks (`EventStreams.on_batch`).
   Dynamo: `RadixTree.apply_event(worker, bytes)`, timed until a final
   `find_matches` returns (its calls run on a background thread).
3. find_matches: latency per call (median, p99) of every trace request's
   hash chain against the final state, `--repeats` passes. The two indexes'
   answers are compared; mismatches are reported.

Prints a table and writes `<out>.json`. Dynamo is an optional benchmark
dependency; the server never imports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triton_disagg.router.config import RouterConfig, RoutingMode, SubscriberConfig
from triton_disagg.router.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    WorkerDump,
    WorkerId,
    decode_batch,
    encode_batch,
)
from triton_disagg.router.index import PrefixIndex
from triton_disagg.router.selection import KvRouter, RouteRequest
from triton_disagg.router.subscriber import EventStreams
from triton_disagg.tools.replay_trace import (
    DEFAULT_TRACE,
    REPO_ROOT,
    TRACE_BLOCK_TOKENS,
    SimWorker,
    TraceRequest,
    load_trace,
)


@dataclass(slots=True, frozen=True)
class RecordedEvent:
    worker_index: int
    event: KVEvent


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def record_events(
    requests: Sequence[TraceRequest], num_workers: int, capacity_blocks: int, block_size: int
) -> list[RecordedEvent]:
    """Route every request (kv mode, no load) and collect the events the workers emit, in order."""
    router = KvRouter(RouterConfig(mode=RoutingMode.KV, block_size=block_size, seed=0))
    workers = [SimWorker(WorkerId(f"worker_{i}"), capacity_blocks, i) for i in range(num_workers)]
    router.sync_workers(worker.worker_id for worker in workers)
    by_id = {worker.worker_id: i for i, worker in enumerate(workers)}
    recorded: list[RecordedEvent] = []
    for request in requests:
        scaled_tokens = -(-request.num_input_tokens * block_size // TRACE_BLOCK_TOKENS)
        decision = router.route(RouteRequest(request.request_id, request.block_hashes, scaled_tokens), 0.0)
        router.on_complete(request.request_id)
        worker = workers[by_id[decision.worker_id]]
        worker.access(request.block_hashes, block_size)
        for event in worker.pending_events:
            router.index.apply_event(worker.worker_id, event)
            recorded.append(RecordedEvent(by_id[worker.worker_id], event))
        worker.pending_events.clear()
    return recorded


def dynamo_json(event: KVEvent, event_id: int) -> bytes:
    if isinstance(event, BlockStored):
        blocks = [{"block_hash": h, "tokens_hash": h} for h in event.block_hashes]
        data: object = {"stored": {"parent_hash": event.parent_block_hash, "blocks": blocks}}
    elif isinstance(event, BlockRemoved):
        data = {"removed": {"block_hashes": list(event.block_hashes)}}
    elif isinstance(event, AllCleared):
        data = "cleared"
    else:
        raise TypeError(type(event).__name__)
    return json.dumps({"event_id": event_id, "data": data}).encode()


def merge_removals(recorded: Sequence[RecordedEvent]) -> list[RecordedEvent]:
    """The same stream with each run of one worker's consecutive BlockRemoved events as one event."""
    merged: list[RecordedEvent] = []
    for r in recorded:
        last = merged[-1] if merged else None
        if (
            isinstance(r.event, BlockRemoved)
            and last is not None
            and last.worker_index == r.worker_index
            and isinstance(last.event, BlockRemoved)
        ):
            merged[-1] = RecordedEvent(r.worker_index, BlockRemoved(last.event.block_hashes + r.event.block_hashes))
        else:
            merged.append(r)
    return merged


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)]


def bench_apply(
    recorded: Sequence[RecordedEvent], names: Sequence[WorkerId], repeats: int, radix_tree_cls: type
) -> tuple[dict[str, list[float]], object, PrefixIndex]:
    """Seconds per run of each way of applying `recorded`, runs interleaved; returns the last trees built."""
    dynamo_wire = [(r.worker_index, dynamo_json(r.event, i)) for i, r in enumerate(recorded)]
    ours_wire = [encode_batch(EventBatch(names[r.worker_index], 1, i, (r.event,))) for i, r in enumerate(recorded, 1)]
    decoded = [(names[r.worker_index], r.event) for r in recorded]
    seqs = dict.fromkeys(names, 0)
    per_worker_wire = []  # numbered per worker, as the router sees them
    for r in recorded:
        name = names[r.worker_index]
        seqs[name] += 1
        per_worker_wire.append(encode_batch(EventBatch(name, 1, seqs[name], (r.event,))))

    def fresh_index() -> PrefixIndex:
        index = PrefixIndex()
        for name in names:
            index.add_worker(name)
        return index

    def dynamo() -> object:
        tree = radix_tree_cls()
        for worker_index, payload in dynamo_wire:
            tree.apply_event(worker_index, payload)
        tree.find_matches([0])  # queued behind every event on the tree's thread
        return tree

    def ours_wire_path() -> PrefixIndex:
        index = fresh_index()
        for payload in ours_wire:
            batch = decode_batch(payload)
            for event in batch.events:
                index.apply_event(batch.worker_id, event)
        return index

    def ours_decoded() -> PrefixIndex:
        index = fresh_index()
        for worker_id, event in decoded:
            index.apply_event(worker_id, event)
        return index

    def ours_router_path() -> PrefixIndex:
        streams = EventStreams(fresh_index(), SubscriberConfig())
        for name in names:
            streams.add_worker(name, 0.0)
            streams.on_dump(WorkerDump(name, 1, 0, ()), 0.0)  # in sync from an empty cache
        for payload in per_worker_wire:
            streams.on_batch(decode_batch(payload), 0.0)
        if streams.counts.get("applied") != len(recorded):
            raise RuntimeError(f"router path did not apply every batch: {streams.counts}")
        return streams.index

    contestants = {
        "dynamo RadixTree (JSON bytes)": dynamo,
        "ours: decode + apply (msgpack bytes)": ours_wire_path,
        "ours: apply only (decoded events)": ours_decoded,
        "ours: decode + seq checks + apply": ours_router_path,
    }
    runs_s: dict[str, list[float]] = {name: [] for name in contestants}
    built: dict[str, object] = {}
    order = list(contestants)
    for repeat in range(repeats):
        for name in order[repeat % len(order) :] + order[: repeat % len(order)]:
            gc.collect()
            start_s = time.perf_counter()
            built[name] = contestants[name]()
            runs_s[name].append(time.perf_counter() - start_s)
    ours = built["ours: decode + apply (msgpack bytes)"]
    assert isinstance(ours, PrefixIndex)
    ours.check_integrity()
    return runs_s, built["dynamo RadixTree (JSON bytes)"], ours


def bench_find_matches(
    tree: object, ours: PrefixIndex, queries: Sequence[list], names: Sequence[WorkerId], repeats: int
) -> tuple[dict[str, list[int]], int]:
    """Nanoseconds per find_matches call of each index, alternating which goes first; and answers that differ."""
    mismatches = 0
    for query in queries:
        scores = tree.find_matches(query).scores  # type: ignore[attr-defined]
        theirs = {worker: score for (worker, _), score in scores.items()}
        mine = {names.index(w): score for w, score in ours.find_matches(query).items()}
        mismatches += theirs != mine
    latencies_ns: dict[str, list[int]] = {"dynamo RadixTree": [], "ours PrefixIndex": []}
    clock = time.perf_counter_ns
    gc.collect()
    for repeat in range(repeats):
        for i, query in enumerate(queries):
            calls = [
                ("dynamo RadixTree", tree.find_matches),  # type: ignore[attr-defined]
                ("ours PrefixIndex", ours.find_matches),
            ]
            if (i + repeat) % 2:
                calls.reverse()
            for name, find in calls:
                start_ns = clock()
                find(query)
                latencies_ns[name].append(clock() - start_ns)
    return latencies_ns, mismatches


def main(argv: Sequence[str] | None = None) -> int:
    def env(name: str, default: object) -> str:
        return os.environ.get(f"TRITON_DISAGG_BENCH_INDEX_{name.upper()}", str(default))

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=Path(env("trace", DEFAULT_TRACE)))
    parser.add_argument("--workers", type=int, default=int(env("workers", 8)))
    parser.add_argument("--capacity-blocks", type=int, default=int(env("capacity_blocks", 4096)))
    parser.add_argument("--block-size", type=int, default=int(env("block_size", 16)))
    parser.add_argument(
        "--repeats", type=int, default=int(env("repeats", 5)), help="apply runs and find_matches passes"
    )
    parser.add_argument("--out", type=Path, default=Path(env("out", REPO_ROOT / "results" / "bench_index")))
    args = parser.parse_args(argv)
    try:
        from dynamo._core import RadixTree
    except ImportError:
        print("dynamo._core is missing; install the benchmark extra: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if not args.trace.is_file():
        print(f"trace {args.trace} not found; pass --trace PATH", file=sys.stderr)
        return 2

    progress(f"routing {args.trace.name} over {args.workers} workers x {args.capacity_blocks} blocks")
    requests = load_trace(args.trace, args.block_size)
    names = [WorkerId(f"worker_{i}") for i in range(args.workers)]
    engine_events = record_events(requests, args.workers, args.capacity_blocks, args.block_size)
    streams = {"engine events": engine_events, "removals merged": merge_removals(engine_events)}
    rows: list[dict] = []
    for stream_name, recorded in streams.items():
        num_blocks = sum(len(r.event.block_hashes) for r in recorded if not isinstance(r.event, AllCleared))
        progress(f"{stream_name}: {len(recorded)} events ({num_blocks} blocks), {args.repeats} runs each")
        runs_s, tree, ours = bench_apply(recorded, names, args.repeats, RadixTree)
        for name, runs in runs_s.items():
            seconds = statistics.median(runs)
            rows.append({"measure": "apply", "stream": stream_name, "index": name, "num_events": len(recorded),
                         "num_blocks": num_blocks, "events_per_s": len(recorded) / seconds,
                         "blocks_per_s": num_blocks / seconds, "median_s": seconds, "runs_s": runs})
    progress(f"find_matches: {len(requests)} requests x {args.repeats} passes")
    queries = [list(request.block_hashes) for request in requests]
    latencies_ns, mismatches = bench_find_matches(tree, ours, queries, names, args.repeats)
    for name, values in latencies_ns.items():
        values.sort()
        rows.append({"measure": "find_matches", "index": name, "median_us": statistics.median(values) / 1e3,
                     "p99_us": percentile(values, 0.99) / 1e3, "mean_us": statistics.fmean(values) / 1e3,
                     "calls": len(values)})

    print(f"{len(requests)} requests routed over {args.workers} workers x {args.capacity_blocks} blocks")
    print(f"{'apply (median of ' + str(args.repeats) + ' runs)':<55} {'events/s':>10} {'blocks/s':>11}")
    for row in rows:
        if row["measure"] == "apply":
            label = f"{row['stream']} ({row['num_events']} ev): {row['index']}"
            print(f"{label:<55} {row['events_per_s']:>10,.0f} {row['blocks_per_s']:>11,.0f}")
    title = f"find_matches ({len(queries)} queries x {args.repeats})"
    print(f"{title:<55} {'median us':>10} {'p99 us':>11}")
    for row in rows:
        if row["measure"] == "find_matches":
            print(f"{row['index']:<55} {row['median_us']:>10.2f} {row['p99_us']:>11.2f}")
    print(f"answers differing between the two indexes: {mismatches} of {len(queries)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"trace": str(args.trace), "workers": args.workers, "capacity_blocks": args.capacity_blocks,
              "num_queries": len(queries), "mismatches": mismatches, "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    progress(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
