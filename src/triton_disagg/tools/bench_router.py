"""KV router against round-robin on a real server: prefix-heavy trace, real engine, measured TTFT.

    python -m triton_disagg.tools.bench_router [--trace ../shared/traces/synthetic_trace.jsonl] [--requests 120]

Replays requests of a Mooncake-format trace that belong to prefix-sharing
families (same first block), in trace order, scaled so that one trace block
(one hash id) becomes one 16-token KV block of the default model, against one Triton server per routing mode (fresh caches each), with
two decode workers. Prints per mode the time to first token (mean, p50, p90)
and the prefix-cache hit ratio the workers report, writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from triton_disagg.tools.bench_disagg import _stream  # streamed request with TTFT/ITL capture
from triton_disagg.tools.replay_trace import DEFAULT_TRACE  # the shared trace next to the checkout

BLOCK_SIZE = 16


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def block_text(hash_id: int) -> str:
    """16 printable bytes standing for one trace block; equal ids give equal text."""
    return f"<{hash_id:013d}>,"[:BLOCK_SIZE]


def load_prompts(trace: Path, num_requests: int, max_blocks: int, min_family: int = 5) -> list[str]:
    """The first `num_requests` requests, in trace order, among those whose first block is shared
    by at least `min_family` requests: the trace's prefix-sharing families, kept whole."""
    records = [json.loads(line)["hash_ids"] for line in trace.open()]
    family_sizes: dict[int, int] = {}
    for hash_ids in records:
        family_sizes[hash_ids[0]] = family_sizes.get(hash_ids[0], 0) + 1
    prompts = []
    for hash_ids in records:
        if family_sizes[hash_ids[0]] >= min_family:
            # The tokenizer adds <s>, so token blocks straddle text blocks by one token: equal
            # hash-id prefixes still give equal token prefixes, which is all prefix caching needs.
            prompts.append("".join(block_text(h) for h in hash_ids[:max_blocks]))
            if len(prompts) == num_requests:
                break
    return prompts


def ceiling_hit_ratio(prompts: list[str]) -> float:
    """Fraction of blocks that an infinite cache shared by all workers would serve."""
    seen: set[str] = set()
    hits = total = 0
    for prompt in prompts:
        for end in range(BLOCK_SIZE, len(prompt) + 1, BLOCK_SIZE):
            total += 1
            hits += prompt[:end] in seen
            seen.add(prompt[:end])
    return hits / total


def _metric_sum(metrics_url: str, name: str) -> int:
    import re

    import requests

    text = requests.get(metrics_url, timeout=10).text
    return int(sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)))


def run_mode(model_path: Path, mode: str, prompts: list[str], concurrency: int, max_tokens: int, decode_workers: int) -> dict:
    from triton_disagg.launch.server import ServerConfig, TritonServer

    with tempfile.TemporaryDirectory() as run_dir:
        config = ServerConfig(
            model_path=model_path, run_dir=Path(run_dir), http_port=18500, grpc_port=18501, metrics_port=18502,
            prefill_workers=0, decode_workers=decode_workers, routing_mode=mode, exit_timeout_s=2,
        )
        progress(f"{mode}: starting Triton with {decode_workers} decode workers")
        with TritonServer(config) as server:
            url = f"{server.http_url}/v2/models/llm/generate_stream"
            results: list[tuple[float, float]] = []
            lock = threading.Lock()
            start = time.perf_counter()
            for i in range(0, len(prompts), concurrency):
                threads = [
                    threading.Thread(
                        target=_stream,
                        args=(url, {"text_input": p, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                                    "exclude_input_in_output": True}, results, lock),
                    )
                    for p in prompts[i : i + concurrency]
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                if (i // concurrency) % 10 == 0:
                    progress(f"{mode}: {min(i + concurrency, len(prompts))}/{len(prompts)} requests")
            elapsed = time.perf_counter() - start
            prompt_tokens = _metric_sum(server.metrics_url, "triton_disagg_prompt_tokens_total")
            hit_tokens = _metric_sum(server.metrics_url, "triton_disagg_prefix_hit_tokens_total")
    ttft = sorted(r[0] for r in results)
    return {
        "mode": mode,
        "ttft_mean_ms": statistics.mean(ttft),
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p90_ms": ttft[int(0.9 * (len(ttft) - 1))],
        "hit_ratio": hit_tokens / prompt_tokens,
        "elapsed_s": elapsed,
        "ttft_ms": ttft,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV router vs round-robin TTFT on a real Triton server.")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--max-blocks", type=int, default=48, help="trace blocks kept per prompt (16 tokens each)")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--decode-workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["kv", "round_robin"])
    parser.add_argument("--out", type=Path, default=Path("results/bench_router"))
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        raise SystemExit(f"trace {args.trace} not found; pass --trace PATH")

    from triton_disagg.checkpoint import make_model

    model = make_model(Path(tempfile.mkdtemp()) / "tiny-llama")
    prompts = load_prompts(args.trace, args.requests, args.max_blocks)
    rows = [run_mode(model, mode, prompts, args.concurrency, args.max_tokens, args.decode_workers) for mode in args.modes]
    results = {"requests": len(prompts), "ceiling_hit_ratio": ceiling_hit_ratio(prompts), "modes": rows,
               "decode_workers": args.decode_workers, "concurrency": args.concurrency}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ttft = row["ttft_ms"]
        ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=f"{row['mode']} (hit {row['hit_ratio']:.0%})")
    ax.set(xlabel="time to first token (ms)", ylabel="fraction of requests", title="KV router vs round-robin, real engine")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)

    print(f"\n{len(prompts)} trace requests, {args.decode_workers} decode workers; infinite-cache hit ceiling "
          f"{results['ceiling_hit_ratio']:.1%}")
    print(f"{'mode':12} {'TTFT mean':>10} {'p50':>8} {'p90':>8} {'hit ratio':>10}")
    for row in rows:
        print(f"{row['mode']:12} {row['ttft_mean_ms']:10.1f} {row['ttft_p50_ms']:8.1f} {row['ttft_p90_ms']:8.1f} {row['hit_ratio']:10.1%}")
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
