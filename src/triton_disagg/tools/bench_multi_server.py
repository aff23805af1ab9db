"""What crossing Triton servers costs: one server against three on this machine, same workload.

    python -m triton_disagg.tools.bench_multi_server [--out results/bench_multi_server]

Both layouts serve disaggregated (every prompt prefilled on the prefill
worker, its KV pulled by the decode worker): "one server" runs llm, router,
prefill_0 and decode_0 in one tritonserver (BLS between them); "three
servers" runs the entry models on 127.0.0.1, prefill_0 on 127.0.0.2 and
decode_0 on 127.0.0.3 (Triton gRPC between them, KV over NIXL, KV events over
TCP). Streamed requests with distinct prompts at each concurrency; prints
TTFT and ITL side by side with their ratios (targets: ITL within 1.15x, TTFT
within 5 ms plus the transfer) and writes `<out>.json` and `<out>.png`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from triton_disagg.launch.server import ServerConfig, free_ports
from triton_disagg.launch.server_group import ServerGroup
from triton_disagg.tools.bench_disagg import _load  # streamed load with TTFT/ITL percentiles
from triton_disagg.tools.report import write_report

LAYOUTS = ("one server", "three servers")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _group(layout: str, model_path: Path, run_dir: Path) -> ServerGroup:
    ports = iter(free_ports(9))
    common = {"model_path": model_path, "min_remote_prefill_tokens": 0, "exit_timeout_s": 2, "llm_instances": 2}

    def config(name: str, host: str, **overrides) -> ServerConfig:
        return ServerConfig(
            run_dir=run_dir / name, host=host, http_port=next(ports), grpc_port=next(ports), metrics_port=next(ports),
            **common | overrides,
        )  # fmt: skip

    if layout == "one server":
        return ServerGroup(config("main", "127.0.0.1", prefill_workers=1, decode_workers=1))
    entry = config("entry", "127.0.0.1", prefill_workers=0, decode_workers=0, has_worker_servers=True)
    return ServerGroup(
        entry,
        [
            config("prefill", "127.0.0.2", prefill_workers=1, decode_workers=0, entry_grpc_url=entry.grpc_url),
            config("decode", "127.0.0.3", prefill_workers=0, decode_workers=1, entry_grpc_url=entry.grpc_url),
        ],
    )


def bench(model_path: Path, concurrencies: list[int], num_requests: int, prompt_tokens: int, max_tokens: int) -> list[dict]:
    rows = []
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as run_dir:
            progress(f"{layout}: starting Triton")
            with _group(layout, model_path, Path(run_dir)) as group:
                url = group.entry.http_url
                _load(url, 2, 4, prompt_tokens, 8)  # warm-up: NIXL connections, gRPC channels
                for concurrency in concurrencies:
                    progress(f"{layout}: concurrency {concurrency}, {num_requests} requests")
                    stats = _load(url, concurrency, num_requests, prompt_tokens, max_tokens)
                    rows.append({"layout": layout, "concurrency": concurrency} | stats)
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Per concurrency: three servers against one (ITL ratio, TTFT difference)."""
    out = []
    for concurrency in sorted({r["concurrency"] for r in rows}):
        one, three = (next(r for r in rows if r["layout"] == layout and r["concurrency"] == concurrency) for layout in LAYOUTS)
        out.append(
            {
                "concurrency": concurrency,
                "itl_p50_ratio": three["itl_p50_ms"] / one["itl_p50_ms"],
                "ttft_p50_extra_ms": three["ttft_p50_ms"] - one["ttft_p50_ms"],
            }
        )
    return out


def print_table(results: dict) -> None:
    print(f"\n{'layout':14} {'conc':>4} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8} {'tok/s':>7}")
    for r in results["rows"]:
        print(
            f"{r['layout']:14} {r['concurrency']:4} {r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:9.1f} "
            f"{r['itl_p50_ms']:8.2f} {r['itl_p90_ms']:8.2f} {r['output_tokens_per_s']:7.0f}"
        )
    print(f"\n{'conc':>4} {'ITL p50 three/one':>18} {'TTFT p50 three-one (ms)':>24}")
    for r in results["ratios"]:
        print(f"{r['concurrency']:4} {r['itl_p50_ratio']:18.2f} {r['ttft_p50_extra_ms']:24.1f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in zip(axes, ("ttft_p50_ms", "itl_p50_ms"), ("Time to first token p50", "Inter-token latency p50")):
        for layout in LAYOUTS:
            rows = [r for r in results["rows"] if r["layout"] == layout]
            ax.plot([r["concurrency"] for r in rows], [r[metric] for r in rows], marker="o", label=layout)
        ax.set(xlabel="concurrent requests", ylabel="ms", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TTFT and ITL on one Triton server against three on this machine.")
    parser.add_argument("--out", type=Path, default=Path("results/bench_multi_server"))
    parser.add_argument("--model", type=Path, help="checkpoint (default: a fresh default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from triton_disagg.checkpoint import make_model

    model = args.model or make_model(Path(tempfile.mkdtemp()) / "tiny-llama")
    rows = bench(model, args.concurrency, args.requests, args.prompt_tokens, args.max_tokens)
    settings = {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    results = {"settings": settings, "rows": rows, "ratios": ratios(rows)}
    write_report(results, args.out, plot, print_table)


if __name__ == "__main__":
    main()
