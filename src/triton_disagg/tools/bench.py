"""`triton-disagg bench`: measure deployments through the OpenAI frontend with AIPerf.

AIPerf runs as a separate process, the load generator people already trust,
in up to three scenarios per server configuration:

    sweep   a concurrency sweep (--concurrency 1,4,8), --requests-per-point each
    rate    --rate-requests requests arriving at --request-rate per second
    trace   a Mooncake-format trace (timestamps, lengths, prefix-block hashes),
            scaled to the model: token counts divided by --trace-scale, one hash
            block of 512 tokens becoming 512 / --trace-scale tokens, so requests
            that share a prefix in the trace share it here

Servers: --url benches a frontend that is already running; otherwise each
--config NAME="serve flags" gets a fresh server (Triton plus frontend) in turn,
and the results sit side by side. --compare disagg / router are presets:
aggregated against disaggregated, and KV routing against round-robin.

Writes <output-dir>/bench.json, a table on stdout, and bench.png (TTFT, ITL and
throughput against concurrency; TTFT and ITL of the rate and trace runs).
AIPerf's own artifacts stay under <output-dir>/<config>/<scenario>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from triton_disagg.launch.server import ServerError, TritonServer, free_ports

#: Seconds between progress lines while AIPerf runs.
PROGRESS_EVERY_S = 10.0
#: AIPerf's Mooncake block: one hash id stands for this many tokens.
MOONCAKE_BLOCK_TOKENS = 512

PRESETS = {
    "disagg": {
        "aggregated": "--prefill-workers 0 --decode-workers 1",
        "disaggregated": "--prefill-workers 1 --decode-workers 1 --min-remote-prefill-tokens 0",
    },
    "router": {
        "kv": "--prefill-workers 0 --decode-workers 2 --routing-mode kv",
        "round_robin": "--prefill-workers 0 --decode-workers 2 --routing-mode round_robin",
    },
}


class BenchError(RuntimeError):
    """AIPerf failed; the message carries the end of its log."""


@dataclass(slots=True, frozen=True)
class Scenario:
    """One AIPerf invocation: a concurrency sweep, a request-rate run, or a trace replay."""

    kind: str  # "sweep", "rate" or "trace"
    concurrency: tuple[int, ...] = ()
    requests_per_point: int = 0
    request_rate: float = 0.0
    num_requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    #: A Mooncake-format file already scaled to the model (trace scenarios).
    trace_path: Path | None = None
    trace_block_tokens: int = 0


@dataclass(slots=True, frozen=True)
class Target:
    """Where AIPerf sends requests, and what it needs to make them."""

    url: str
    model: str
    tokenizer: str
    api_key: str | None = None


@dataclass(slots=True)
class RunResult:
    """The figures of one AIPerf run (one point of a sweep). Latencies in ms."""

    config: str
    scenario: str
    concurrency: int | None
    num_requests: int
    num_errors: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    request_throughput_per_s: float
    output_token_throughput_per_s: float
    is_complete: bool = True


def aiperf_command(target: Target, scenario: Scenario, artifact_dir: Path) -> list[str]:
    """The `aiperf profile` command line for one scenario."""
    command = [
        "aiperf", "profile",
        "--model", target.model,
        "--url", target.url,
        "--endpoint-type", "completions",
        "--streaming",
        "--tokenizer", target.tokenizer,
        # Our usage counts are the model's own; re-tokenizing generated text can differ from them.
        "--use-server-token-count",
        "--extra-inputs", "ignore_eos:true",
        "--output-artifact-dir", str(artifact_dir),
        "--no-auto-plot",
        "--ui-type", "none",
        "--random-seed", "0",
    ]  # fmt: skip
    if target.api_key:
        command += ["--api-key", target.api_key]
    if scenario.kind == "trace":
        command += [
            "--input-file", str(scenario.trace_path),
            "--custom-dataset-type", "mooncake_trace",
            "--prompt-input-tokens-block-size", str(scenario.trace_block_tokens),
            "--fixed-schedule",
        ]  # fmt: skip
        return command
    command += [
        "--prompt-input-tokens-mean", str(scenario.input_tokens),
        "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(scenario.output_tokens),
        "--prompt-output-tokens-stddev", "0",
    ]  # fmt: skip
    if scenario.kind == "sweep":
        command += [
            "--concurrency", ",".join(map(str, scenario.concurrency)),
            "--request-count", str(scenario.requests_per_point),
        ]  # fmt: skip
    elif scenario.kind == "rate":
        command += ["--request-rate", str(scenario.request_rate), "--request-count", str(scenario.num_requests)]
    else:
        raise ValueError(f"unknown scenario kind {scenario.kind!r}")
    return command


def scale_trace(
    source: Path, dest: Path, *, num_requests: int, scale: int, max_input_tokens: int, max_output_tokens: int, speedup: float
) -> dict:
    """Write the first `num_requests` records of a Mooncake trace, scaled to a small model.

    Token counts are divided by `scale` (rounded up, at least 1), so a hash block
    stands for 512 / scale tokens; a prompt is cut to whole blocks within
    `max_input_tokens`, an output to `max_output_tokens`; timestamps are divided
    by `speedup` and start at 0. Returns what was written: requests, duration_s,
    mean input and output tokens, and the block size in tokens.
    """
    if MOONCAKE_BLOCK_TOKENS % scale:
        raise ValueError(f"trace scale must divide {MOONCAKE_BLOCK_TOKENS}, got {scale}")
    if speedup <= 0:
        raise ValueError(f"trace speedup must be > 0, got {speedup}")
    block_tokens = MOONCAKE_BLOCK_TOKENS // scale
    max_blocks = max_input_tokens // block_tokens
    if max_blocks < 1:
        raise ValueError(f"max_input_tokens ({max_input_tokens}) is below one block of {block_tokens} tokens")
    records = []
    with open(source) as lines:
        for line in lines:
            if len(records) == num_requests:
                break
            if line.strip():
                records.append(json.loads(line))
    if not records:
        raise ValueError(f"trace {source} has no records")
    start_ms = records[0]["timestamp"]
    scaled = []
    for record in records:
        hash_ids = record["hash_ids"][:max_blocks]
        input_tokens = min(math.ceil(record["input_length"] / scale), len(hash_ids) * block_tokens)
        scaled.append(
            {
                "timestamp": int((record["timestamp"] - start_ms) / speedup),
                "input_length": max(1, input_tokens),
                "output_length": max(1, min(math.ceil(record["output_length"] / scale), max_output_tokens)),
                "hash_ids": hash_ids,
            }
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(json.dumps(r) + "\n" for r in scaled))
    return {
        "requests": len(scaled),
        "duration_s": scaled[-1]["timestamp"] / 1000,
        "mean_input_tokens": sum(r["input_length"] for r in scaled) / len(scaled),
        "mean_output_tokens": sum(r["output_length"] for r in scaled) / len(scaled),
        "block_tokens": block_tokens,
    }


def read_run(path: Path, config: str, scenario: str, concurrency: int | None = None) -> RunResult:
    """A RunResult from AIPerf's profile_export_aiperf.json. Raises BenchError if it is missing."""
    if not path.is_file():
        raise BenchError(f"AIPerf wrote no {path.name} under {path.parent}; see its log there")
    data = json.loads(path.read_text())

    def stat(name: str, key: str) -> float:
        value = data.get(name, {}).get(key)
        return float("nan") if value is None else float(value)

    num_errors = sum(int(entry.get("count", 0)) for entry in data.get("error_summary") or [])
    return RunResult(
        config=config,
        scenario=scenario,
        concurrency=concurrency,
        num_requests=int(stat("request_count", "avg")) if "request_count" in data else 0,
        num_errors=num_errors,
        ttft_p50_ms=stat("time_to_first_token", "p50"),
        ttft_p90_ms=stat("time_to_first_token", "p90"),
        ttft_p99_ms=stat("time_to_first_token", "p99"),
        itl_p50_ms=stat("inter_token_latency", "p50"),
        itl_p90_ms=stat("inter_token_latency", "p90"),
        request_throughput_per_s=stat("request_throughput", "avg"),
        output_token_throughput_per_s=stat("output_token_throughput", "avg"),
        # A run AIPerf cut short is still reported, marked, rather than passed off as a full point.
        is_complete=bool(data.get("is_complete", True)) and not data.get("was_cancelled", False),
    )


def local_hub_entry(tokenizer_dir: Path, hub_cache: Path) -> str:
    """Expose a tokenizer directory as the offline Hugging Face hub repo `local/<name>`; return that name.

    AIPerf's trace loaders load the tokenizer in worker processes in offline mode,
    where a plain directory path is taken for a hub repo id and fails; a snapshot
    in a hub cache of our own (HF_HUB_CACHE, with HF_HUB_OFFLINE=1) loads everywhere.
    """
    tokenizer_dir = Path(tokenizer_dir).resolve()
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer directory {tokenizer_dir} has no tokenizer.json; pass --tokenizer DIR")
    name = tokenizer_dir.name
    repo = hub_cache / f"models--local--{name}"
    revision = "0" * 40
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for file in ("tokenizer.json", "tokenizer_config.json", "config.json", "special_tokens_map.json"):
        if (tokenizer_dir / file).is_file():
            shutil.copyfile(tokenizer_dir / file, snapshot / file)
    return f"local/{name}"


def aiperf_executable() -> str:
    """The `aiperf` next to this interpreter. Raises BenchError naming the extra to install when it is missing."""
    path = Path(sys.executable).with_name("aiperf")
    if not path.is_file():
        raise BenchError(f"AIPerf is not installed ({path} is missing); install the bench extra: pip install 'triton-disagg[bench]'")
    return str(path)


def run_scenario(target: Target, scenario: Scenario, config: str, artifact_dir: Path, label: str) -> list[RunResult]:
    """Run AIPerf for one scenario; print progress while it runs; return one result per point."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    log_path = artifact_dir / "aiperf.log"
    hub_cache = artifact_dir.parent.parent / "hf_hub_cache"
    if Path(target.tokenizer).is_dir():
        target = dataclasses.replace(target, tokenizer=local_hub_entry(Path(target.tokenizer), hub_cache))
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1")
    command = aiperf_command(target, scenario, artifact_dir)
    command[0] = aiperf_executable()
    print(f"{label} running: {shlex.join(command[1:3])} ... (log: {log_path})", flush=True)
    start_s = last_report_s = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            while process.poll() is None:
                time.sleep(0.5)
                if time.monotonic() >= last_report_s + PROGRESS_EVERY_S:
                    last_report_s = time.monotonic()
                    print(f"{label} ... {last_report_s - start_s:.0f} s: {_last_progress(log_path)}", flush=True)
        finally:  # Ctrl-C or an error here must not leave AIPerf running
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if process.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"aiperf failed (exit code {process.returncode}); last lines of {log_path}:\n{tail}")
    if scenario.kind == "sweep" and len(scenario.concurrency) > 1:
        results = [
            read_run(artifact_dir / f"concurrency_{c}" / "profile_export_aiperf.json", config, "sweep", c)
            for c in scenario.concurrency
        ]
    else:
        concurrency = scenario.concurrency[0] if scenario.kind == "sweep" else None
        results = [read_run(artifact_dir / "profile_export_aiperf.json", config, scenario.kind, concurrency)]
    summary = ", ".join(f"TTFT p50 {r.ttft_p50_ms:.1f} ms, ITL p50 {r.itl_p50_ms:.2f} ms" for r in results[-1:])
    print(f"{label} done in {time.monotonic() - start_s:.0f} s ({summary})", flush=True)
    return results


def _last_progress(log_path: Path) -> str:
    """AIPerf's latest progress line ("Profiling: 16/20 ..."), shortened."""
    text = log_path.read_text(errors="replace")
    for line in reversed(text.replace("\r", "\n").splitlines()):
        for marker in ("Profiling:", "Processing Records:", "System state:"):
            if marker in line:
                return line[line.index(marker) :][:60]
    return "starting"


@contextmanager
def deployment(name: str, serve_flags: str, run_dir: Path):
    """A fresh Triton server and frontend described by `serve` flags; yields the Target to bench."""
    from triton_disagg.launch.flags import EnvFlags, add_serve_flags, server_config
    from triton_disagg.launch.frontend import FrontendProcess, add_frontend_flags, frontend_config

    http_port, grpc_port, metrics_port, frontend_port = free_ports(4)
    argv = [*shlex.split(serve_flags), "--run-dir", str(run_dir / name)]
    argv += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    argv += ["--frontend-port", str(frontend_port), "--frontend-host", "127.0.0.1", "--api-keys", ""]
    parser = argparse.ArgumentParser(prog=f"--config {name}=")
    add_serve_flags(EnvFlags(parser))
    add_frontend_flags(EnvFlags(parser))
    args = parser.parse_args(argv)
    start_s = time.monotonic()
    print(f"[{name}] starting a server: {serve_flags}", flush=True)
    with TritonServer(server_config(args)) as server:
        with FrontendProcess(frontend_config(args, server.grpc_url), server.run_dir / "frontend.log") as frontend:
            model_path = server.config.model_path
            target = Target(url=frontend.url, model=model_path.resolve().name, tokenizer=str(model_path))
            print(f"[{name}] ready in {time.monotonic() - start_s:.0f} s: {frontend.url}", flush=True)
            yield target


def print_table(results: list[RunResult]) -> str:
    header = (
        f"{'config':<14} {'scenario':<8} {'conc':>5} {'reqs':>5} {'errs':>4} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p90':>8} {'req/s':>7} {'tok/s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        conc = "" if r.concurrency is None else str(r.concurrency)
        lines.append(
            f"{r.config:<14} {r.scenario:<8} {conc:>5} {r.num_requests:>5} {r.num_errors:>4} {r.ttft_p50_ms:>7.1f}ms "
            f"{r.ttft_p99_ms:>7.1f}ms {r.itl_p50_ms:>6.2f}ms {r.itl_p90_ms:>6.2f}ms {r.request_throughput_per_s:>7.2f} "
            f"{r.output_token_throughput_per_s:>8.1f}"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r.config for r in results))
    others = [r for r in results if r.scenario != "sweep"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    sweep_panels = [
        ("ttft_p50_ms", "TTFT p50 (ms)"),
        ("itl_p50_ms", "ITL p50 (ms)"),
        ("output_token_throughput_per_s", "output tokens/s"),
        ("request_throughput_per_s", "requests/s"),
    ]
    for ax, (attr, ylabel) in zip(axes.flat[:4], sweep_panels):
        for config in configs:
            points = sorted((r.concurrency, getattr(r, attr)) for r in results if r.config == config and r.scenario == "sweep")
            if points:
                ax.plot(*zip(*points), marker="o", label=config)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    scenarios = list(dict.fromkeys(r.scenario for r in others))
    for ax, (attr, ylabel) in zip(axes.flat[4:], [("ttft_p50_ms", "TTFT p50 (ms)"), ("itl_p50_ms", "ITL p50 (ms)")]):
        width = 0.8 / max(1, len(configs))
        for i, config in enumerate(configs):
            values = [next((getattr(r, attr) for r in others if r.config == config and r.scenario == s), 0) for s in scenarios]
            ax.bar([x + i * width for x in range(len(scenarios))], values, width, label=config)
        ax.set_xticks([x + width * (len(configs) - 1) / 2 for x in range(len(scenarios))], scenarios)
        ax.set_ylabel(ylabel)
        ax.set_title("request-rate and trace runs")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("triton-disagg bench (AIPerf through the OpenAI frontend)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scenarios_from_args(args: argparse.Namespace, output_dir: Path) -> tuple[list[Scenario], dict | None]:
    scenarios = []
    if args.concurrency:
        scenarios.append(
            Scenario("sweep", concurrency=args.concurrency, requests_per_point=args.requests_per_point,
                     input_tokens=args.input_tokens, output_tokens=args.output_tokens)
        )  # fmt: skip
    if args.request_rate > 0:
        scenarios.append(
            Scenario("rate", request_rate=args.request_rate, num_requests=args.rate_requests,
                     input_tokens=args.input_tokens, output_tokens=args.output_tokens)
        )  # fmt: skip
    trace_info = None
    if args.trace:
        trace_path = output_dir / "trace_scaled.jsonl"
        trace_info = scale_trace(
            Path(args.trace), trace_path, num_requests=args.trace_requests, scale=args.trace_scale,
            max_input_tokens=args.trace_max_input_tokens, max_output_tokens=args.output_tokens, speedup=args.trace_speedup,
        )  # fmt: skip
        scenarios.append(Scenario("trace", trace_path=trace_path, trace_block_tokens=trace_info["block_tokens"]))
    if not scenarios:
        raise ValueError("nothing to run: give --concurrency, --request-rate > 0 or --trace")
    return scenarios, trace_info


def configs_from_args(args: argparse.Namespace) -> dict[str, str]:
    if args.url:
        if args.config or args.compare:
            raise ValueError("--url benches a running frontend; it cannot be combined with --config or --compare")
        return {}
    configs = dict(PRESETS[args.compare]) if args.compare else {}
    for entry in args.config or []:
        name, sep, flags = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--config takes NAME=\"serve flags\", got {entry!r}")
        configs[name.strip()] = flags
    return configs or {"default": ""}


def bench(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = configs_from_args(args)
    scenarios, trace_info = scenarios_from_args(args, output_dir)
    results: list[RunResult] = []
    num_steps = max(1, len(configs)) * len(scenarios)
    step = 0

    def run_all(config: str, target: Target) -> None:
        nonlocal step
        for scenario in scenarios:
            step += 1
            label = f"[{step}/{num_steps}] {config}/{scenario.kind}"
            results.extend(run_scenario(target, scenario, config, output_dir / config / scenario.kind, label))

    try:
        if args.url:
            model = args.model or _served_model(args.url, args.api_key)
            run_all("running", Target(args.url.rstrip("/"), model, args.tokenizer, args.api_key))
        else:
            for name, flags in configs.items():
                with deployment(name, flags, output_dir / "servers") as target:
                    run_all(name, target)
    except (BenchError, ServerError) as e:
        print(f"triton-disagg bench: {e}", file=sys.stderr)
        if results:
            _report(results, configs, scenarios, trace_info, args.url, output_dir)
            print("(the results above are partial)", file=sys.stderr)
        return 1
    _report(results, configs, scenarios, trace_info, args.url, output_dir)
    failed = sum(r.num_errors for r in results)
    if failed:
        print(f"{failed} requests failed; see the AIPerf logs under {output_dir}", file=sys.stderr)
    incomplete = [f"{r.config}/{r.scenario}" for r in results if not r.is_complete]
    if incomplete:
        print(f"AIPerf did not complete: {', '.join(incomplete)}", file=sys.stderr)
    return 1 if failed or incomplete else 0


def _report(results: list[RunResult], configs: dict, scenarios: list[Scenario], trace_info, url, output_dir: Path) -> None:
    """Print the table; write bench.json and bench.png."""
    print()
    table = print_table(results)
    report = {
        "configs": configs or {"running": url},
        "scenarios": [asdict(s) | {"trace_path": str(s.trace_path) if s.trace_path else None} for s in scenarios],
        "trace": trace_info,
        "results": [asdict(r) for r in results],
        "table": table,
    }
    (output_dir / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, output_dir / "bench.png")
    print(f"\nwrote {output_dir / 'bench.json'} and {output_dir / 'bench.png'}")


def _served_model(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = requests.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def add_bench_flags(flag, int_list) -> None:
    """`bench`'s flags (flag: launch.flags.EnvFlags of the subcommand; int_list parses "1,4,8")."""
    from triton_disagg.serving.settings import DEFAULT_MODEL_PATH

    flag("--url", default=None, help="bench a running frontend at this URL instead of starting servers")
    flag("--model", default=None, help="model name to send with --url (default: the frontend's first model)")
    flag("--tokenizer", default=str(DEFAULT_MODEL_PATH), help="tokenizer directory AIPerf builds prompts with (with --url)")
    flag("--api-key", default=None, help="API key for --url")
    flag("--config", action="append", metavar='NAME="SERVE FLAGS"', help="a server configuration to start and bench (repeatable)")
    flag("--compare", choices=sorted(PRESETS), default=None, help="preset pair: disagg (aggregated vs disaggregated), router (kv vs round_robin)")
    flag("--concurrency", type=int_list, default=(1, 4, 8), help="concurrency sweep, comma-separated (empty: skip)")
    flag("--requests-per-point", type=int, default=32, help="requests per concurrency point")
    flag("--request-rate", type=float, default=4.0, help="arrivals per second of the rate run (0: skip)")
    flag("--rate-requests", type=int, default=40, help="requests of the rate run")
    flag("--input-tokens", type=int, default=256, help="prompt tokens of sweep and rate requests")
    flag("--output-tokens", type=int, default=64, help="output tokens of sweep and rate requests (and the cap for trace ones)")
    flag("--trace", metavar="PATH", default=None, help="Mooncake-format trace to replay (e.g. ../shared/traces/synthetic_trace.jsonl)")
    flag("--trace-requests", type=int, default=60, help="first requests of the trace to replay")
    flag("--trace-scale", type=int, default=32, help="divide the trace's token counts by this (a 512-token block becomes 512/scale)")
    flag("--trace-max-input-tokens", type=int, default=2048, help="cut longer scaled prompts to whole blocks within this")
    flag("--trace-speedup", type=float, default=1.0, help="divide the trace's timestamps by this")
    flag("--output-dir", default="results/bench", help="where bench.json, bench.png and AIPerf's artifacts go")
