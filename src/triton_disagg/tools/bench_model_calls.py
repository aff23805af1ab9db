"""Side by side on one server: `llm` calling the router and the workers over gRPC, then over BLS.

    python -m triton_disagg.tools.bench_model_calls [--streams 4] [--rounds 2] [--requests 24] [--out DIR]

Starts one server (two decode workers, no prefill worker), then alternates
`llm`'s `grpc_url` between this server's gRPC endpoint and "" (BLS) by
loading `llm` again with the changed config, `--rounds` times each. In each
phase `--streams` clients send `--requests` streamed requests in all (64
tokens each, ignore_eos) through Triton's HTTP generate_stream and time every
event: TTFT from the request to the first event, ITL between events. Prints
a table and writes `DIR/bench_model_calls.json`. BLS is the transport that
crashed the `llm` stub under load (see `serving.model_calls`), so a BLS phase
may end with a crashed stub; the table then says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from triton_disagg.launch.flags import default_model
from triton_disagg.launch.server import ServerConfig, TritonServer, free_ports
from triton_disagg.model_control import ModelControl

MAX_TOKENS = 64


def _one(url: str, index: int) -> tuple[float, list[float]] | None:
    body = {"text_input": f"Request {index} asks for a story about the sea. ", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    times = []
    try:
        with requests.post(url, json=body, stream=True, timeout=120, headers={"Connection": "close"}) as response:
            if response.status_code != 200:
                return None
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    times.append(time.perf_counter())
    except requests.RequestException:
        return None
    if not times:
        return None
    return (times[0] - start) * 1e3, [(b - a) * 1e3 for a, b in zip(times, times[1:])]


def _phase(http_url: str, streams: int, num_requests: int) -> dict:
    url = f"{http_url}/v2/models/llm/generate_stream"
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda i: _one(url, i), range(num_requests)))
    done = [r for r in results if r is not None]
    itl = [gap for _, gaps in done for gap in gaps]
    return {
        "requests": num_requests,
        "failed": num_requests - len(done),
        "ttft_mean_ms": statistics.fmean(t for t, _ in done) if done else None,
        "itl_mean_ms": statistics.fmean(itl) if itl else None,
        "itl_p50_ms": statistics.median(itl) if itl else None,
    }


def _use_transport(control: ModelControl, grpc_url: str) -> None:
    config = control.model_config("llm")
    config.setdefault("parameters", {})["grpc_url"] = {"string_value": grpc_url}
    control.load_model("llm", json.dumps(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--out", default="results/model_calls")
    args = parser.parse_args(argv)
    http_port, grpc_port, metrics_port = free_ports(3)
    phases = []
    with tempfile.TemporaryDirectory(prefix="model-calls-") as run_dir:
        config = ServerConfig(
            model_path=default_model(), run_dir=Path(run_dir), http_port=http_port, grpc_port=grpc_port,
            metrics_port=metrics_port, prefill_workers=0, decode_workers=2, exit_timeout_s=2,
        )  # fmt: skip
        with TritonServer(config) as server:
            control = ModelControl(server.http_url)
            grpc_url = f"{config.connect_host}:{grpc_port}"
            for round_index in range(args.rounds):
                for transport, url in (("grpc", grpc_url), ("bls", "")):
                    print(f"[model-calls] round {round_index + 1}/{args.rounds}: {transport}", file=sys.stderr, flush=True)
                    _use_transport(control, url)
                    phases.append({"transport": transport, "round": round_index + 1, **_phase(server.http_url, args.streams, args.requests)})
            control.close()
    print(f"{'transport':<10}{'round':>6}{'failed':>8}{'TTFT ms':>10}{'ITL ms':>9}{'ITL p50':>9}")
    for p in phases:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{p['transport']:<10}{p['round']:>6}{p['failed']:>8}{fmt(p['ttft_mean_ms']):>10}{fmt(p['itl_mean_ms']):>9}{fmt(p['itl_p50_ms']):>9}")
    summary = {}
    for transport in ("grpc", "bls"):
        mine = [p for p in phases if p["transport"] == transport and p["itl_mean_ms"] is not None]
        if mine:
            summary[transport] = {key: statistics.fmean(p[key] for p in mine) for key in ("ttft_mean_ms", "itl_mean_ms")}
    if "grpc" in summary and "bls" in summary:
        summary["itl_grpc_over_bls"] = summary["grpc"]["itl_mean_ms"] / summary["bls"]["itl_mean_ms"]
        summary["ttft_grpc_over_bls"] = summary["grpc"]["ttft_mean_ms"] / summary["bls"]["ttft_mean_ms"]
        print(f"gRPC / BLS: ITL {summary['itl_grpc_over_bls']:.2f}x, TTFT {summary['ttft_grpc_over_bls']:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model_calls.json").write_text(json.dumps({"settings": vars(args), "phases": phases, "summary": summary}, indent=2))
    print(f"wrote {out / 'bench_model_calls.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
