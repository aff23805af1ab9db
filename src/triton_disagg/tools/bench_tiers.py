"""Tiered KV cache benchmark: multi-turn chat on the real engine, tiers off against host memory and disk.

    python -m triton_disagg.tools.bench_tiers [--model PATH] [--conversations 16] [--turns 5]
        [--device-blocks 256] [--concurrency 4] [--out results/bench_tiers]

Each conversation has its own long context (a document or system prompt,
`--context-tokens`) and `--turns` turns: turn t's prompt is the context,
every earlier user message and answer, then a new user message of
`--user-tokens`. Round t sends turn t of every conversation, `--concurrency`
at a time, to an `EngineThread` (the serving loop, in process), greedy, and
measures time to first token (submit to first token) and inter-token
latency. Every conversation's history together is several times the device
pool (`--device-blocks`; the working set is printed), so by the time a
conversation returns its prefix has left the device pool: it is recomputed
(tiers off), brought back from host memory ("host": a host tier holding the
working set), or from disk ("disk": a small host tier in front of a disk
tier; the admission policy writes a block to disk from its second use, so
disk hits start at round 3). With `--cold-disk` (the default) the disk
files are flushed and dropped from the page cache between rounds, so reads
come from the device, not from memory.

A returning turn is classed by where most of its prompt came from (device,
host, disk, or recomputed); the report pairs each with the same turn of
the tiers-off run. Targets: host-hit TTFT <= 0.3x and disk-hit TTFT <= 0.6x
of the tiers-off recompute, decode ITL within 5%.

A second part isolates what offloading costs decoding: one request decodes
`--probe-decode-tokens` tokens while a stream of unique prompts (no prefix
hits, so the same compute either way) finishes around it, each freeing its
blocks; with tiers on, every freed block is copied to host memory, and in
the disk config (admission at the first use here) every block host memory
evicts is written to disk. Its inter-token latency, tiers on against off,
is the critical-path check; the configs alternate `--probe-repeats` times
and each reports the median of its runs' medians, since a shared machine's
noise swamps a single run. Beside it, three figures that other processes
disturb far less: the engine thread's CPU time per step (`thread_time`),
its share spent on tier bookkeeping, and the offload waits at eviction
(`TierStats`).

A third part times the tiers' transports, torch (memmove, file I/O)
against NIXL (UCX, POSIX), on the engine's block size and on a 7B model's
(28 layers, 4 KV heads of 128, BF16, 16 tokens: 896 KiB).

Prints tables; writes `<out>.json` and `<out>.png`; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from triton_disagg.checkpoint import make_model
from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams
from triton_disagg.engine.tiers.block_file import BlockFileHeader, BlockFileLayout
from triton_disagg.engine.tiers.copier import CopyBlocks, ReadFile, TorchMover, WriteFile

BLOCK_SIZE = 16
CLASSES = ("device", "host", "disk", "recompute")


def progress(message: str) -> None:
    print(f"[bench_tiers] {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Turn:
    conversation: int
    turn: int
    num_prompt_tokens: int
    ttft_s: float
    itls_s: list[float]
    source: str  # where most of the prompt came from: device, host, disk, recompute
    num_cached_tokens: int
    num_host_hit_tokens: int
    num_disk_hit_tokens: int


@dataclass(slots=True)
class ConfigResult:
    name: str
    turns: list[Turn] = field(default_factory=list)
    wall_s: float = 0.0
    tier_stats: dict = field(default_factory=dict)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _source(num_prompt: int, out) -> str:
    device = out.num_cached_tokens - out.num_host_hit_tokens - out.num_disk_hit_tokens
    best = max((device, "device"), (out.num_host_hit_tokens, "host"), (out.num_disk_hit_tokens, "disk"))
    return best[1] if best[0] * 2 >= num_prompt else "recompute"


def run_config(name: str, config: EngineConfig, args: argparse.Namespace, disk_dir: Path | None) -> ConfigResult:
    """All rounds of the workload on one fresh engine."""
    engine = LLMEngine(config)
    thread = EngineThread(engine, name=f"bench-{name}")
    thread.start()
    params = SamplingParams(max_tokens=args.output_tokens, ignore_eos=True)
    histories = {c: _tokens(args.context_tokens, 1000 + c) for c in range(args.conversations)}
    result = ConfigResult(name)
    started_s = time.perf_counter()
    for turn in range(args.turns):
        if args.cold_disk and disk_dir is not None:
            _drop_page_cache(disk_dir)
        work: queue.Queue = queue.Queue()
        for c in range(args.conversations):
            work.put(c)

        def client() -> None:
            while True:
                try:
                    c = work.get_nowait()
                except queue.Empty:
                    return
                prompt = histories[c] + _tokens(args.user_tokens, 10_000 * (turn + 1) + c)
                done = threading.Event()
                times: list[float] = []
                outputs: list = []

                def on_output(out, times=times, outputs=outputs, done=done) -> None:
                    times.extend([time.perf_counter()] * len(out.new_token_ids))
                    outputs.append(out)
                    if out.finished:
                        done.set()

                submitted_s = time.perf_counter()
                thread.submit(f"{name}-{c}-{turn}", prompt, params, on_output, lambda exc: done.set())
                done.wait()
                final = outputs[-1]
                answer = [t for out in outputs for t in out.new_token_ids]
                histories[c] = prompt + answer
                result.turns.append(
                    Turn(c, turn, len(prompt), times[0] - submitted_s, [b - a for a, b in zip(times, times[1:])],
                         _source(len(prompt), final), final.num_cached_tokens, final.num_host_hit_tokens,
                         final.num_disk_hit_tokens)
                )

        clients = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        if engine.tiers is not None:
            engine.tiers.copier.wait_idle(60)
        ttfts = [t.ttft_s for t in result.turns if t.turn == turn]
        progress(f"{name}: round {turn + 1}/{args.turns}, median TTFT {statistics.median(ttfts) * 1e3:.1f} ms")
    result.wall_s = time.perf_counter() - started_s
    thread.stop()
    if engine.tiers is not None:
        engine.check_integrity(expect_idle=True)
        result.tier_stats = asdict(engine.tiers.stats)
    engine.shutdown()
    return result


def _drop_page_cache(folder: Path) -> None:
    """Flush the block files and drop them from the page cache, so the next reads go to the device."""
    for path in folder.rglob("*.kvblock"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def probe_decode_itl(name: str, config: EngineConfig, args: argparse.Namespace) -> dict:
    """ITL of one long decode while unique prompts come and go (their freed blocks offloaded when tiers are on)."""
    engine = LLMEngine(config)
    cpu_s: list[float] = []  # the engine thread's CPU time after each step
    thread = EngineThread(engine, name=f"probe-{name}", after_step=lambda: cpu_s.append(time.thread_time()))
    thread.start()
    times: list[float] = []
    done = threading.Event()

    def on_output(out) -> None:
        times.extend([time.perf_counter()] * len(out.new_token_ids))
        if out.finished:
            done.set()

    params = SamplingParams(max_tokens=args.probe_decode_tokens, ignore_eos=True)
    thread.submit("long", _tokens(64, 7), params, on_output, lambda exc: done.set())
    num_background = 0
    while not done.is_set():
        finished = threading.Event()
        thread.submit(f"bg{num_background}", _tokens(args.context_tokens, 50_000 + num_background),
                      SamplingParams(max_tokens=1), lambda out: out.finished and finished.set(), lambda exc: finished.set())
        finished.wait()
        num_background += 1
    thread.stop()
    stats = engine.tiers.stats if engine.tiers is not None else None
    engine.shutdown()
    itls = [b - a for a, b in zip(times, times[1:])]
    decode_s = times[-1] - times[0]
    row = {
        "itl_median_ms": statistics.median(itls) * 1e3,
        "itl_p90_ms": _percentile(itls, 0.9) * 1e3,
        "num_background_prompts": num_background,
        "blocks_to_host": stats.offloaded_blocks["host"] if stats else 0,
        "blocks_to_disk": stats.offloaded_blocks["disk"] if stats else 0,
        "engine_cpu_ms_per_step": (cpu_s[-1] - cpu_s[0]) / (len(cpu_s) - 1) * 1e3,
        "bookkeeping_share": stats.bookkeeping_seconds / decode_s if stats else 0.0,
        "offload_waits": stats.offload_waits if stats else 0,
        "offload_wait_s": stats.offload_wait_seconds if stats else 0.0,
    }
    progress(f"{name}: decode ITL p50 {row['itl_median_ms']:.2f} ms beside {num_background} prompts, "
             f"{row['blocks_to_host']} blocks to host memory, {row['blocks_to_disk']} to disk, "
             f"bookkeeping {row['bookkeeping_share']:.2%} of the engine thread, {row['offload_waits']} offload waits")
    return row


# -- transports -------------------------------------------------------------------------


def bench_transports(block_shapes: dict[str, tuple[int, ...]], num_blocks: int, repeats: int, folder: Path) -> list[dict]:
    """Milliseconds to move `num_blocks` scattered blocks: device pool -> host, host -> files, files -> pool."""
    from triton_disagg.engine.tiers.nixl_mover import NixlMover

    rows = []
    for label, shape in block_shapes.items():
        pool = torch.randn((2 * num_blocks, *shape))
        host = torch.zeros((num_blocks, *shape))
        layout = BlockFileLayout("bench", "float32", shape)
        ids = list(range(0, 2 * num_blocks, 2))  # every other block: no two consecutive
        movers = {"torch": TorchMover(torch.device("cpu")), "nixl": NixlMover(pool)}
        for mover_name, mover in movers.items():
            mover.register_pool(host)
            times: dict[str, list[float]] = {"device_to_host": [], "host_to_disk": [], "disk_to_device": []}
            for rep in range(repeats + 1):
                paths = [folder / f"{label}-{mover_name}-{i}.kvblock" for i in range(num_blocks)]
                start = time.perf_counter()
                mover.copy_blocks(CopyBlocks(pool, ids, host, list(range(num_blocks))), None)
                mid = time.perf_counter()
                for i, path in enumerate(paths):
                    mover.write_file(WriteFile(host, i, path, BlockFileHeader(i + 1, None)), layout)
                written = time.perf_counter()
                _drop_page_cache(folder)
                read_start = time.perf_counter()
                for i, path in enumerate(paths):
                    mover.read_file(ReadFile(path, i + 1, pool, ids[i]), layout)
                end = time.perf_counter()
                if rep:
                    times["device_to_host"].append(mid - start)
                    times["host_to_disk"].append(written - mid)
                    times["disk_to_device"].append(end - read_start)
                for path in paths:
                    path.unlink()
            nbytes = num_blocks * layout.block_bytes
            for move, values in times.items():
                seconds = statistics.median(values)
                rows.append({"block": label, "transport": mover_name, "move": move, "ms": seconds * 1e3,
                             "gb_per_s": nbytes / seconds / 1e9})
                progress(f"{label} {mover_name:5} {move:15} {seconds * 1e3:8.2f} ms  {nbytes / seconds / 1e9:6.2f} GB/s")
    return rows


# -- report -----------------------------------------------------------------------------


def summarize(results: list[ConfigResult], args: argparse.Namespace) -> dict:
    off = {(t.conversation, t.turn): t for t in results[0].turns}
    summary = {}
    for result in results:
        returning = [t for t in result.turns if t.turn > 0]
        itls = [itl for t in result.turns for itl in t.itls_s]
        row = {
            "prefill_tokens_computed": sum(t.num_prompt_tokens - t.num_cached_tokens for t in result.turns),
            "ttft_returning_median_ms": statistics.median(t.ttft_s for t in returning) * 1e3,
            "ttft_returning_p90_ms": _percentile([t.ttft_s for t in returning], 0.9) * 1e3,
            "itl_median_ms": statistics.median(itls) * 1e3,
            "itl_p90_ms": _percentile(itls, 0.9) * 1e3,
            "output_tokens_per_s": sum(len(t.itls_s) + 1 for t in result.turns) / result.wall_s,
            "wall_s": result.wall_s,
            "bookkeeping_share": result.tier_stats.get("bookkeeping_seconds", 0.0) / result.wall_s,
            "offload_waits": result.tier_stats.get("offload_waits", 0),
            "by_source": {},
        }
        for source in CLASSES:
            turns = [t for t in returning if t.source == source]
            if not turns:
                continue
            ratios = [t.ttft_s / off[(t.conversation, t.turn)].ttft_s for t in turns]
            row["by_source"][source] = {
                "num_turns": len(turns),
                "ttft_median_ms": statistics.median(t.ttft_s for t in turns) * 1e3,
                "ttft_p90_ms": _percentile([t.ttft_s for t in turns], 0.9) * 1e3,
                "ttft_ratio_to_off_median": statistics.median(ratios),
            }
        summary[result.name] = row
    base_itl = summary[results[0].name]["itl_median_ms"]
    for row in summary.values():
        row["itl_ratio_to_off"] = row["itl_median_ms"] / base_itl
    return summary


def _median_row(rows: list[dict]) -> dict:
    """Each field's median over repeated runs, plus the spread of the ITL medians."""
    merged = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    merged["itl_median_ms_runs"] = [row["itl_median_ms"] for row in rows]
    return merged


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else 0.0


def format_tables(summary: dict, probe: dict, transports: list[dict]) -> str:
    lines = [
        f"{'config':<6} {'prefill tok':>11} {'TTFT ret p50':>12} {'p90':>8} {'ITL p50':>8} {'ITL ratio':>9} {'tok/s':>7} "
        f"{'bookkeeping':>11} {'offload waits':>13}",
    ]
    for name, row in summary.items():
        lines.append(
            f"{name:<6} {row['prefill_tokens_computed']:>11} {row['ttft_returning_median_ms']:>10.1f}ms "
            f"{row['ttft_returning_p90_ms']:>6.1f}ms {row['itl_median_ms']:>6.2f}ms {row['itl_ratio_to_off']:>9.3f} "
            f"{row['output_tokens_per_s']:>7.1f} {row['bookkeeping_share']:>11.3%} {row['offload_waits']:>13}"
        )
    lines += ["", f"{'config':<6} {'source':<10} {'turns':>5} {'TTFT p50':>9} {'p90':>8} {'x tiers-off':>11}  (returning turns)"]
    for name, row in summary.items():
        for source, cls in row["by_source"].items():
            lines.append(
                f"{name:<6} {source:<10} {cls['num_turns']:>5} {cls['ttft_median_ms']:>7.1f}ms {cls['ttft_p90_ms']:>6.1f}ms "
                f"{cls['ttft_ratio_to_off_median']:>11.3f}"
            )
    if probe:
        lines += ["", f"{'config':<6} {'decode ITL p50':>14} {'p90':>8} {'x off':>6} {'CPU/step':>9} {'x off':>6} "
                      f"{'to host':>8} {'to disk':>8} {'bookkeeping':>11} {'offload waits':>13}  (medians of runs)"]
        for name, row in probe.items():
            off = probe["off"]
            lines.append(
                f"{name:<6} {row['itl_median_ms']:>12.2f}ms {row['itl_p90_ms']:>6.2f}ms "
                f"{row['itl_median_ms'] / off['itl_median_ms']:>6.3f} {row['engine_cpu_ms_per_step']:>7.2f}ms "
                f"{row['engine_cpu_ms_per_step'] / off['engine_cpu_ms_per_step']:>6.3f} {row['blocks_to_host']:>8.0f} "
                f"{row['blocks_to_disk']:>8.0f} {row['bookkeeping_share']:>11.3%} {row['offload_waits']:>13.0f}"
            )
    if transports:
        lines += ["", f"{'block':<8} {'transport':<9} {'move':<15} {'ms':>8} {'GB/s':>6}"]
        lines += [f"{r['block']:<8} {r['transport']:<9} {r['move']:<15} {r['ms']:>8.2f} {r['gb_per_s']:>6.2f}" for r in transports]
    return "\n".join(lines)


def plot(summary: dict, probe: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = list(summary)
    for i, source in enumerate(CLASSES):
        values = [summary[n]["by_source"].get(source, {}).get("ttft_median_ms", 0) for n in names]
        axes[0].bar([x + 0.2 * i for x in range(len(names))], values, width=0.2, label=source)
    axes[0].set_xticks([x + 0.3 for x in range(len(names))], names)
    axes[0].set_title("returning-turn TTFT p50 (ms) by where the prefix came from")
    axes[0].legend()
    axes[1].bar(names, [summary[n]["prefill_tokens_computed"] for n in names], color="tab:purple")
    axes[1].set_title("prompt tokens computed")
    x = range(len(names))
    axes[2].bar([i - 0.2 for i in x], [summary[n]["itl_median_ms"] for n in names], width=0.4, label="multi-turn")
    if probe:
        axes[2].bar([i + 0.2 for i in x], [probe[n]["itl_median_ms"] for n in names], width=0.4,
                    label="beside unique prompts (median of runs)")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("decode ITL p50 (ms)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the tiny model, written to a temp dir)")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=5, help="rounds of turns (>= 2: the first has nothing to return to)")
    parser.add_argument("--context-tokens", type=int, default=1600, help="each conversation's own context")
    parser.add_argument("--user-tokens", type=int, default=48, help="tokens of each new user message")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--device-blocks", type=int, default=256, help="device pool, in 16-token blocks")
    parser.add_argument("--disk-host-blocks", type=int, default=128, help="the disk config's host tier")
    parser.add_argument("--concurrency", type=int, default=2, help="conversations in flight (their prompts must fit the pool together)")
    parser.add_argument("--cold-disk", type=lambda v: v.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--probe-decode-tokens", type=int, default=300, help="the ITL probe's decode (0: skip)")
    parser.add_argument("--probe-repeats", type=int, default=3, help="alternating runs of each probe config")
    parser.add_argument("--transport-blocks", type=int, default=128, help="blocks per transport measurement (0: skip)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_tiers"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.turns < 2:
        print("bench_tiers: --turns must be >= 2 (returning turns are what it measures)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-tiers-"))
    model = args.model or make_model(work / "model")
    history_tokens = args.context_tokens + args.turns * (args.user_tokens + args.output_tokens)
    working_set_blocks = args.conversations * -(-history_tokens // BLOCK_SIZE)
    progress(f"working set {working_set_blocks} blocks = {working_set_blocks / args.device_blocks:.1f}x the device pool")
    base = {"model_path": str(model), "num_blocks": args.device_blocks, "block_size": BLOCK_SIZE, "max_num_seqs": args.concurrency}
    configs = {
        "off": (EngineConfig(**base, kv_host_blocks=0), None),
        "host": (EngineConfig(**base, kv_host_blocks=2 * working_set_blocks), None),
        "disk": (
            EngineConfig(**base, kv_host_blocks=args.disk_host_blocks, kv_disk_path=str(work / "disk"),
                         kv_disk_blocks=2 * working_set_blocks),
            work / "disk",
        ),
    }
    results = [run_config(name, config, args, disk_dir) for name, (config, disk_dir) in configs.items()]
    probe = {}
    if args.probe_decode_tokens:
        probe_configs = {
            "off": configs["off"][0],
            "host": configs["host"][0],
            "disk": replace(configs["disk"][0], kv_disk_path=str(work / "probe-disk"), kv_disk_min_uses=1),
        }
        runs: dict[str, list[dict]] = {name: [] for name in probe_configs}
        for _ in range(args.probe_repeats):
            for name, config in probe_configs.items():
                runs[name].append(probe_decode_itl(name, config, args))
        probe = {name: _median_row(rows) for name, rows in runs.items()}
    transports = []
    if args.transport_blocks:
        engine_block = (4, 2, BLOCK_SIZE, 2, 32)  # the tiny model's (L, 2, BS, KVH, D), float32: 32 KiB
        shapes = {"32KiB": engine_block, "896KiB": (28, 2, BLOCK_SIZE, 4, 64)}  # 7B BF16 bytes, as float32 elements
        (work / "transport").mkdir()
        transports = bench_transports(shapes, args.transport_blocks, 3, work / "transport")
    summary = summarize(results, args)
    print(format_tables(summary, probe, transports))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "working_set_blocks": working_set_blocks,
        "working_set_over_device_pool": working_set_blocks / args.device_blocks,
        "summary": summary,
        "tier_stats": {r.name: r.tier_stats for r in results},
        "decode_itl_probe": probe,
        "transports": transports,
        "turns": {r.name: [asdict(t) | {"itls_s": None} for t in r.turns] for r in results},
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(summary, probe, args.out.with_suffix(".png"))
    progress(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
