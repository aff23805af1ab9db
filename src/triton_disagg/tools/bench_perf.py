"""`triton-disagg bench perf`: the performance targets, each a ratio measured side by side in one run.

    triton-disagg bench perf --out DIR [--model PATH] [--device auto] [--quick]

| key                     | what                                                              | target  |
|-------------------------|-------------------------------------------------------------------|---------|
| `paged_over_contiguous` | decode step, 64 seqs x 2,048 ctx: paged / contiguous-KV SDPA      | <= 1.2  |
| `itl_ratio`             | inter-token latency through Triton / engine alone, same request   | <= 1.10 |
| `ttft_delta_ms`         | time to first token through Triton - engine alone                 | <= 5 ms |
| `relay_ratio`           | tokens/s through `llm` / the worker streamed directly, 32 streams | >= 0.8  |
| `cached_ttft_ratio`     | TTFT with a 90% cached prefix / cold, 2,048-token prompt          | <= 0.25 |
| `nixl_over_memcpy`      | NIXL READ between processes / memcpy, 8B-sized blocks, 128+ blocks | >= 0.8 |

Writes DIR/bench_perf.json (those keys at the top, the detail under
`detail`), DIR/bench_perf.png, and prints a table; progress goes to stderr.
Each part alternates or interleaves what it compares, so load from other
processes on a shared machine falls on both sides; the machine's load
average is recorded before and after.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {  # key: (target, "max" if the figure must stay at or under it, else "min")
    "paged_over_contiguous": (1.2, "max"),
    "itl_ratio": (1.10, "max"),
    "ttft_delta_ms": (5.0, "max"),
    "relay_ratio": (0.8, "min"),
    "cached_ttft_ratio": (0.25, "max"),
    "nixl_over_memcpy": (0.8, "min"),
}
#: Block shape of a Llama-3-8B KV pool: (layers, K/V, block tokens, KV heads, head dim), bfloat16.
LLAMA_8B_BLOCK = ((32, 2, 16, 8, 128), torch.bfloat16)


#: The relay measurements in `detail`, the headline one first.
RELAY_RUNS = ("relay", "relay_short_requests", "relay_one_response_per_token")


def _relay_mode(relay: dict) -> str:
    """How the null worker sent, and how long the streams were, of one relay measurement."""
    sending = "one response per token" if relay["worker_step_ms"] is None else f"steps of {relay['worker_step_ms']} ms"
    return f"{sending}, {relay['max_tokens']}-token streams"


def progress(message: str) -> None:
    print(f"[bench perf] {message}", file=sys.stderr, flush=True)


def add_perf_flags(flag) -> None:
    """`bench perf`'s flags (flag: launch.flags.EnvFlags of the subcommand)."""
    from triton_disagg.launch.flags import boolean

    flag("--out", metavar="DIR", default="results/bench_perf", help="directory for bench_perf.json and bench_perf.png")
    flag("--model", metavar="PATH", default=None, help="checkpoint (default: a fresh copy of the default model)")
    flag("--device", default="auto", help="engine device for the engine-side parts: auto, cpu, cuda")
    flag("--repeats", type=int, default=5, help="repeats of each engine-side and latency measurement")
    flag("--relay-rounds", type=int, default=3, help="rounds of the relay comparison")
    flag("--relay-step-ms", type=float, default=1.0, help="the null worker's step period for the relay figure")
    flag("--relay-tokens", type=int, default=1000, help="tokens of each relayed stream (long enough for the steady rate)")
    flag("--quick", type=boolean, nargs="?", const=True, default=False, help="smaller sizes for a smoke run (figures not comparable to the targets)")


def run(args) -> int:
    """Run every part, write DIR/bench_perf.json and .png, print the table. Returns 0."""
    from triton_disagg.checkpoint import make_model
    from triton_disagg.engine.config import EngineConfig
    from triton_disagg.tools import perf_engine, perf_serving
    from triton_disagg.tools.bench_disagg import bench_transfer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = str(args.model or make_model(Path(tempfile.mkdtemp()) / "tiny-llama"))
    device = str(EngineConfig(model_path=model_path, device=args.device).resolve_device())
    quick = args.quick
    detail: dict = {
        "model": Path(model_path).name,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "quick": quick,
    }
    started = time.monotonic()
    progress(f"decode step, paged against contiguous KV ({device})")
    detail["decode_step"] = perf_engine.bench_decode_step(
        model_path, device, 8 if quick else 64, 256 if quick else 2048, 16, 2 if quick else 3 * args.repeats, progress
    )
    progress("time to first token with a cached prefix")
    detail["cached_prefix"] = perf_engine.bench_cached_prefix(
        model_path, device, 512 if quick else 2048, 0.9, 2 if quick else args.repeats, progress
    )
    progress("KV transfer: NIXL between processes against memcpy")
    transfer_device = torch.device("cuda" if device.startswith("cuda") else "cpu")
    detail["nixl"] = bench_transfer(transfer_device, [32] if quick else [128, 512], 2 if quick else 3, {"llama-3-8b": LLAMA_8B_BLOCK})
    detail["served"] = perf_serving.bench_served_overhead(model_path, 128, 16 if quick else 64, 2 if quick else args.repeats, progress)
    # The ceiling is the steady rate (long streams); short streams add each request's start to it.
    streams, tokens, short_tokens = (8, 50, 50) if quick else (32, args.relay_tokens, 200)
    rounds = 1 if quick else args.relay_rounds
    detail["relay"] = perf_serving.bench_relay(model_path, streams, tokens, rounds, 2, args.relay_step_ms, progress)
    detail["relay_short_requests"] = perf_serving.bench_relay(
        model_path, streams, short_tokens, rounds, 2, args.relay_step_ms, progress
    )
    detail["relay_one_response_per_token"] = perf_serving.bench_relay(model_path, streams, short_tokens, rounds, 2, None, progress)
    detail["load_average_after"] = os.getloadavg()
    detail["elapsed_s"] = time.monotonic() - started
    results = {
        "paged_over_contiguous": detail["decode_step"]["paged_over_contiguous"],
        "itl_ratio": detail["served"]["itl_ratio"],
        "ttft_delta_ms": detail["served"]["ttft_delta_ms"],
        "relay_ratio": detail["relay"]["relay_ratio"],
        "cached_ttft_ratio": detail["cached_prefix"]["cached_ttft_ratio"],
        # The worst of the 8B-sized transfers of 128 blocks or more.
        "nixl_over_memcpy": min(row["nixl_over_memcpy"] for row in detail["nixl"] if quick or row["num_blocks"] >= 128),
        "targets": {key: {"target": target, "kind": kind} for key, (target, kind) in TARGETS.items()},
        "detail": detail,
    }
    (out / "bench_perf.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "bench_perf.png")
    print_table(results)
    print(f"\nwrote {out / 'bench_perf.json'} and {out / 'bench_perf.png'}")
    return 0


def meets(key: str, value: float) -> bool:
    target, kind = TARGETS[key]
    return value <= target if kind == "max" else value >= target


def print_table(results: dict) -> None:
    detail = results["detail"]
    print(f"\nbench perf on {detail['device']} ({detail['cpus']} CPUs, load {detail['load_average_before'][0]:.1f} before)")
    print(f"{'figure':24} {'measured':>9} {'target':>9}  met")
    for key, (target, kind) in TARGETS.items():
        sign = "<=" if kind == "max" else ">="
        value = results[key]
        print(f"{key:24} {value:9.3f} {sign:>3}{target:6.2f}  {'yes' if meets(key, value) else 'NO'}")
    step = detail["decode_step"]
    print(
        f"\ndecode step {step['num_seqs']}x{step['context_tokens']} ({step['paged_backend']}): "
        + ", ".join(f"{name} {ms:.1f} ms" for name, ms in step["step_ms"].items())
        + f"; one layer's attention: "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in step["attention_ms_one_layer"].items())
    )
    served = detail["served"]
    print(
        f"served: TTFT {served['engine_ttft_ms']:.1f} / {served['triton_ttft_ms']:.1f} ms, "
        f"ITL {served['engine_itl_ms']:.2f} / {served['triton_itl_ms']:.2f} ms (engine alone / through Triton)"
    )
    for name in RELAY_RUNS:
        relay = detail[name]
        print(
            f"relay ({_relay_mode(relay)}): direct {relay['direct_tokens_per_s']:.0f} tok/s, through llm "
            f"{relay['relayed_tokens_per_s']:.0f} tok/s, ratio {relay['relay_ratio']:.2f}"
        )
    cached = detail["cached_prefix"]
    print(f"cached prefix: cold {cached['cold_ttft_ms']:.1f} ms, {cached['cached_tokens']} tokens cached {cached['cached_ttft_ms']:.1f} ms")
    for row in detail["nixl"]:
        print(
            f"NIXL {row['num_blocks']} blocks {row['pattern']:10} ({row['descriptors']} descriptors): {row['nixl_gbps']:.2f} GB/s, "
            f"memcpy {row['memcpy_gbps']:.2f}, torch copy {row['copy_gbps']:.2f}"
        )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    detail = results["detail"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    keys = list(TARGETS)
    # Each figure as a fraction of its target, so all share one axis: <= 1 is met for every one.
    fractions = [
        results[key] / TARGETS[key][0] if TARGETS[key][1] == "max" else TARGETS[key][0] / max(results[key], 1e-9)
        for key in keys
    ]
    colours = ["tab:green" if meets(key, results[key]) else "tab:red" for key in keys]
    axes[0].barh(keys, fractions, color=colours)
    axes[0].axvline(1.0, color="black", linestyle="--")
    axes[0].set(xlabel="measured / target (<= 1 meets it)", title="Targets")
    for y, key in enumerate(keys):
        axes[0].text(fractions[y], y, f" {results[key]:.2f}", va="center")
    step = detail["decode_step"]
    names = list(step["step_ms"])
    axes[1].bar([n + "\n(step)" for n in names], [step["step_ms"][n] for n in names], color="tab:blue")
    axes[1].set(ylabel="ms", title=f"Decode step, {step['num_seqs']} seqs x {step['context_tokens']} tokens")
    relay = detail["relay"]
    width = 0.8 / len(RELAY_RUNS)
    for i, run_detail in enumerate(detail[name] for name in RELAY_RUNS):
        axes[2].bar([x + (i - 1) * width for x in range(2)], [run_detail["direct_tokens_per_s"], run_detail["relayed_tokens_per_s"]],
                    width, label=_relay_mode(run_detail))  # fmt: skip
    axes[2].set(xticks=range(2), xticklabels=["direct", "through llm"], ylabel="tokens/s", title=f"Relay, {relay['streams']} streams")
    axes[2].legend()
    for ax in axes[1:]:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"bench perf: {detail['model']} on {detail['device']} (load {detail['load_average_before'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
