"""Disaggregation benchmark: KV transfer throughput, and latency aggregated against disaggregated.

    python -m triton_disagg.tools.bench_disagg [--device auto] [--out results/bench_disagg]

1. NIXL READ throughput between two processes, through the worker's own
   connector (`NixlConnector.start_pull`), for KV block layouts of the
   default model and of a Llama-3-8B-sized pool, contiguous and scattered
   blocks, against an in-process memcpy of the same descriptor runs in the same run.
2. Time to first token and inter-token latency under concurrent streamed
   load on one Triton server: aggregated (decode workers prefill) against
   disaggregated (every prompt prefilled on a prefill worker, KV pulled).

Prints tables and writes `<out>.json` and `<out>.png`. `--skip-serving`
runs only part 1 (no Triton needed), e.g. on a GPU machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from triton_disagg.tools.report import write_report

#: Per-block shapes (layers, K/V, tokens, KV heads, head dim) and dtypes.
LAYOUTS = {
    "tiny-llama (default model)": ((4, 2, 16, 2, 32), torch.float32),
    "llama-3-8b": ((32, 2, 16, 8, 128), torch.bfloat16),
}


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _serve_pool(shape, dtype, num_blocks: int, device: str, ready: mp.Queue, stop: mp.Event) -> None:
    """The 'prefill' side: a registered pool with recognisable contents, kept alive until `stop`."""
    from triton_disagg.kv_transfer.nixl_connector import NixlConnector

    pool = torch.empty((num_blocks, *shape), dtype=dtype, device=device)
    pool.copy_(torch.arange(pool.numel(), device=device).reshape(pool.shape).to(dtype))
    connector = NixlConnector(f"bench-prefill-{uuid.uuid4().hex[:6]}", pool)
    ready.put((connector.layout, connector.metadata))
    while not stop.wait(0.0005):  # as a prefill engine polls while it holds KV: NIXL progresses when polled
        connector.released_holds()


def bench_transfer(
    device: torch.device, num_blocks_list: list[int], repeats: int, layouts: dict | None = None
) -> list[dict]:
    """NIXL READ GB/s between two processes against in-process copies of the same runs (medians).

    `copy_gbps` is torch's copy (threaded on CPU), `memcpy_gbps` libc memcpy on one thread
    (the device copy on a GPU). `layouts` defaults to LAYOUTS.
    """
    from triton_disagg.kv_transfer.handle import TransferState
    from triton_disagg.kv_transfer.handle import KVHandle
    from triton_disagg.kv_transfer.layout import merge_runs
    from triton_disagg.kv_transfer.nixl_connector import NixlConnector

    rows = []
    ctx = mp.get_context("spawn")
    for layout_name, (shape, dtype) in (layouts or LAYOUTS).items():
        block_bytes = torch.empty(shape, dtype=dtype).numel() * torch.empty((), dtype=dtype).element_size()
        pool_blocks = 2 * max(num_blocks_list) + 1
        ready, stop = ctx.Queue(), ctx.Event()
        server = ctx.Process(target=_serve_pool, args=(shape, dtype, pool_blocks, str(device), ready, stop))
        server.start()
        try:
            remote_layout, metadata = ready.get(timeout=120)
            local = torch.zeros((pool_blocks, *shape), dtype=dtype, device=device)
            local_bytes = local.view(-1).view(torch.uint8)
            source_bytes = torch.ones_like(local).view(-1).view(torch.uint8)
            connector = NixlConnector(f"bench-decode-{uuid.uuid4().hex[:6]}", local)
            connector.add_peer_threadsafe(remote_layout, metadata)
            for num_blocks in num_blocks_list:
                for pattern in ("contiguous", "scattered"):
                    if pattern == "contiguous":
                        remote_ids, local_ids = list(range(num_blocks)), list(range(num_blocks))
                    else:  # every other block on both sides: one descriptor per block
                        remote_ids, local_ids = list(range(0, 2 * num_blocks, 2)), list(range(1, 2 * num_blocks, 2))
                    handle = KVHandle(remote_layout.agent_name, "bench", tuple(remote_ids), (), num_blocks * shape[2], shape[2])
                    nixl_s = []
                    for _ in range(repeats + 1):
                        start = time.perf_counter()
                        transfer = connector.start_pull(handle, local_ids, remote_ids)
                        while (state := connector.poll(transfer)) == TransferState.PENDING:
                            time.sleep(0.0002)  # as the engine loop polls; the copy runs on the connector's thread
                        nixl_s.append(time.perf_counter() - start)
                        connector.finish(transfer, handle)
                        if state != TransferState.DONE:
                            raise RuntimeError(f"NIXL transfer failed ({layout_name}, {num_blocks} blocks)")
                    # Reference: memcpy of the same descriptor runs between two pools of this process.
                    copy_s = []
                    runs = merge_runs(local_ids, remote_ids)
                    for _ in range(repeats + 1):
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        start = time.perf_counter()
                        for local_start, remote_start, length in runs:
                            local_bytes[local_start * block_bytes : (local_start + length) * block_bytes].copy_(
                                source_bytes[remote_start * block_bytes : (remote_start + length) * block_bytes]
                            )
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        copy_s.append(time.perf_counter() - start)
                    memcpy_s = copy_s  # on a GPU the device copy is the memcpy
                    if device.type == "cpu":  # libc memcpy, one thread, of the same runs
                        memcpy_s = []
                        for _ in range(repeats + 1):
                            start = time.perf_counter()
                            for local_start, remote_start, length in runs:
                                ctypes.memmove(
                                    local_bytes.data_ptr() + local_start * block_bytes,
                                    source_bytes.data_ptr() + remote_start * block_bytes,
                                    length * block_bytes,
                                )
                            memcpy_s.append(time.perf_counter() - start)
                    total_bytes = num_blocks * block_bytes
                    nixl_gbps = total_bytes / statistics.median(nixl_s[1:]) / 1e9
                    copy_gbps = total_bytes / statistics.median(copy_s[1:]) / 1e9
                    memcpy_gbps = total_bytes / statistics.median(memcpy_s[1:]) / 1e9
                    rows.append(
                        {
                            "layout": layout_name,
                            "block_kib": block_bytes / 1024,
                            "num_blocks": num_blocks,
                            "pattern": pattern,
                            "mib": total_bytes / 2**20,
                            "descriptors": len(runs),
                            "nixl_gbps": nixl_gbps,
                            "copy_gbps": copy_gbps,
                            "memcpy_gbps": memcpy_gbps,
                            "nixl_over_copy": nixl_gbps / copy_gbps,
                            "nixl_over_memcpy": nixl_gbps / memcpy_gbps,
                        }
                    )
                    progress(
                        f"{layout_name:28} {num_blocks:5} blocks {pattern:10} NIXL {nixl_gbps:6.2f} GB/s, "
                        f"memcpy {memcpy_gbps:6.2f} GB/s, torch copy {copy_gbps:6.2f} GB/s"
                    )
        finally:
            stop.set()
            server.join(timeout=30)
    return rows


def _stream(url: str, body: dict, results: list, lock: threading.Lock) -> None:
    import requests

    times = []
    start = time.perf_counter()
    with requests.post(url, json=body, stream=True, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if event.get("text_output"):
                    times.append(time.perf_counter())
    gaps = [b - a for a, b in zip(times, times[1:])]
    with lock:
        results.append(((times[0] - start) * 1e3, statistics.mean(gaps) * 1e3 if gaps else 0.0))


def _load(http_url: str, concurrency: int, num_requests: int, prompt_tokens: int, max_tokens: int) -> dict:
    url = f"{http_url}/v2/models/llm/generate_stream"
    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    bodies = [
        {
            # Distinct prompts (a number up front), so no prefix-cache hit helps either mode.
            "text_input": f"{i:06d} " + "".join(chr(97 + (i + j) % 26) for j in range(prompt_tokens - 8)),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "exclude_input_in_output": True,
        }
        for i in range(num_requests)
    ]
    start = time.perf_counter()
    for batch_start in range(0, num_requests, concurrency):
        threads = [
            threading.Thread(target=_stream, args=(url, body, results, lock))
            for body in bodies[batch_start : batch_start + concurrency]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    itl = sorted(r[1] for r in results)
    return {
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p90_ms": ttft[int(0.9 * (len(ttft) - 1))],
        "itl_p50_ms": statistics.median(itl),
        "itl_p90_ms": itl[int(0.9 * (len(itl) - 1))],
        "output_tokens_per_s": num_requests * max_tokens / elapsed,
    }


def bench_serving(model_path: Path, concurrencies: list[int], num_requests: int, prompt_tokens: int, max_tokens: int) -> list[dict]:
    from triton_disagg.launch.server import ServerConfig, TritonServer

    modes = {
        "aggregated": {"prefill_workers": 0, "decode_workers": 1},
        "disaggregated": {"prefill_workers": 1, "decode_workers": 1, "min_remote_prefill_tokens": 0},
    }
    rows = []
    for mode, overrides in modes.items():
        with tempfile.TemporaryDirectory() as run_dir:
            config = ServerConfig(
                model_path=model_path, run_dir=Path(run_dir), http_port=18300, grpc_port=18301, metrics_port=18302,
                exit_timeout_s=2, **overrides,
            )
            progress(f"{mode}: starting Triton ({overrides})")
            with TritonServer(config) as server:
                _load(server.http_url, 2, 4, prompt_tokens, 8)  # warm-up
                for concurrency in concurrencies:
                    progress(f"{mode}: concurrency {concurrency}, {num_requests} requests")
                    rows.append({"mode": mode, "concurrency": concurrency} | _load(server.http_url, concurrency, num_requests, prompt_tokens, max_tokens))
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if results.get("serving") else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for layout in LAYOUTS:
        for pattern, style in (("contiguous", "-"), ("scattered", "--")):
            rows = [r for r in results["transfer"] if r["layout"] == layout and r["pattern"] == pattern]
            ax.plot([r["mib"] for r in rows], [r["nixl_gbps"] for r in rows], style, marker="o", label=f"NIXL {layout} {pattern}")
        rows = [r for r in results["transfer"] if r["layout"] == layout and r["pattern"] == "contiguous"]
        ax.plot([r["mib"] for r in rows], [r["copy_gbps"] for r in rows], ":", marker="x", label=f"in-process copy {layout}")
    ax.set(xscale="log", xlabel="MiB moved", ylabel="GB/s", title=f"KV transfer ({results['device']})")
    ax.legend(fontsize=6)
    if results.get("serving"):
        for col, metric, title in ((1, "ttft_p50_ms", "Time to first token p50"), (2, "itl_p50_ms", "Inter-token latency p50")):
            ax = axes[0][col]
            for mode in ("aggregated", "disaggregated"):
                rows = [r for r in results["serving"] if r["mode"] == mode]
                ax.plot([r["concurrency"] for r in rows], [r[metric] for r in rows], marker="o", label=mode)
            ax.set(xlabel="concurrent requests", ylabel="ms", title=title)
            ax.legend()
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_tables(results: dict) -> None:
    print(f"\nKV transfer on {results['device']} (median of {results['repeats']}):")
    print(f"{'layout':28} {'KiB/blk':>8} {'blocks':>6} {'pattern':10} {'MiB':>8} {'NIXL GB/s':>9} {'copy GB/s':>9} {'ratio':>6}")
    for r in results["transfer"]:
        print(
            f"{r['layout']:28} {r['block_kib']:8.0f} {r['num_blocks']:6} {r['pattern']:10} {r['mib']:8.1f} "
            f"{r['nixl_gbps']:9.2f} {r['copy_gbps']:9.2f} {r['nixl_over_copy']:6.2f}"
        )
    if results.get("serving"):
        print("\nServing (one Triton server per mode, streamed requests):")
        print(f"{'mode':14} {'conc':>4} {'TTFT p50':>9} {'TTFT p90':>9} {'ITL p50':>8} {'ITL p90':>8} {'tok/s':>7}")
        for r in results["serving"]:
            print(
                f"{r['mode']:14} {r['concurrency']:4} {r['ttft_p50_ms']:9.1f} {r['ttft_p90_ms']:9.1f} "
                f"{r['itl_p50_ms']:8.2f} {r['itl_p90_ms']:8.2f} {r['output_tokens_per_s']:7.0f}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV transfer throughput and aggregated vs disaggregated latency.")
    parser.add_argument("--device", default="auto", help="where the KV pools live (cpu, cuda, auto)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_disagg"))
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-serving", action="store_true")
    parser.add_argument("--model", type=Path, help="checkpoint for the serving part (default: a fresh default model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    device = _device(args.device)
    results: dict = {"device": str(device), "repeats": args.repeats}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name()
    results["transfer"] = bench_transfer(device, args.blocks, args.repeats)
    if not args.skip_serving:
        from triton_disagg.checkpoint import make_model

        model = args.model or make_model(Path(tempfile.mkdtemp()) / "tiny-llama")
        results["serving"] = bench_serving(model, args.concurrency, args.requests, args.prompt_tokens, args.max_tokens)
    write_report(results, args.out, plot, print_tables)


if __name__ == "__main__":
    main()
