"""Replay traffic against simulated prefill/decode pools sized by each planner policy.

    python -m triton_disagg.tools.simulate_planner [--workloads bursty,mooncake,shifting] [--profile FILE]
        [--trace ../shared/traces/synthetic_trace.jsonl] [--ttft-ms 3000] [--itl-ms 40] [--interval-s 15]
        [--budget 24] [--shifting-budget 10] [--startup-s 16] [--unload-s 1.6] [--warmup-s 60]
        [--headroom 0.4] [--worker-slowdown 1] [--out results/simulate_planner]

Three workloads: `bursty` (Poisson arrivals whose rate ramps up to bursts of
several times the base rate, lognormal lengths, fixed seed), `mooncake` (the
trace's timestamps and lengths) and `shifting` (a steady stream whose mix
moves: long outputs make decode the bottleneck, then long prompts prefill,
then long outputs again; planner_sim/workloads.py). Per workload, every
policy runs: `static_peak` (the SLO arithmetic applied to the busiest
interval in hindsight, held all along: the control), `static_mean` (the same
for the mean interval), `load`, and `slo_<predictor>` for each predictor.
The planners start from the minimum pools under a device budget (`--budget`;
`--shifting-budget` for the shifting workload, where both pools share it);
the static splits hold what they are given.

Simulated workers follow the profile (`--profile`, or a synthetic one of a
7B-class model on an H100: prefill about 25k tokens/s at short prompts,
slower with length; decode ITL growing with concurrency and context); the
worker model is in planner_sim/cluster.py. A worker the planner adds costs
its device from the load call and serves after `--startup-s`; a removed one
stops taking work and costs until drained plus `--unload-s`; under a budget,
a worker is loaded only once a device is free. Both times default to what
`python -m triton_disagg.tools.bench_worker_load` measured on a real server
(docs/benchmarks/planner/worker_load.json). `--worker-slowdown` makes the
workers slower than the profile the planners read, to show what their
corrections are worth (SLO policies then also run uncorrected).

The planner sees what its metrics reader would on a real server
(planner_sim/cluster.py, `Cluster.observe`). A request meets its SLO when
its TTFT and its mean ITL (decode time, waits included, over output tokens
- 1) are both within target. Reported per policy: SLO attainment and
device-seconds, and their ratio to static_peak, over the requests that
arrived and the devices held after `--warmup-s` (every planner starts cold
at its minimum pools; `slo_attainment_all_pct` counts every request), and
whether each pool changed size. On the Mooncake trace no policy can pass
about 93.5%: with the synthetic profile a prompt over ~43k tokens takes
longer than the 3 s TTFT target to prefill even alone, and 258 of the
trace's 3,993 requests are that long. Prints a table, writes `<out>.json`
and `<out>_<workload>.png` (load, pool sizes, devices held and TTFT p99 over
time); progress goes to stderr. Every flag can also be set by an environment
variable `TRITON_DISAGG_SIMULATE_<FLAG>`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from triton_disagg.planner.config import PlannerConfig, PlannerPolicy, PredictorKind
from triton_disagg.planner.core import Planner
from triton_disagg.planner.profile import DecodeProfile, PerformanceProfile, PrefillProfile
from triton_disagg.planner.sizing import LoadForecast, decode_need, prefill_need
from triton_disagg.tools.planner_sim.cluster import STEP_S, Cluster, Request, percentile
from triton_disagg.tools.planner_sim.report import PolicyResult, Timeline, plot, print_table
from triton_disagg.tools.planner_sim.workloads import bursty_arrivals, mooncake_arrivals, shifting_arrivals

#: The checkout this file lies in (src/triton_disagg/tools/ -> the repository root).
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "synthetic_trace.jsonl"
#: Time after the last arrival allowed for the pools to drain.
DRAIN_S = 900.0
#: A worker's start-up and unload on a real server, measured by `python -m triton_disagg.tools.bench_worker_load`
#: (docs/benchmarks/planner/worker_load.json: medians over prefill and decode workers of the default model, on a
#: loaded 2-core CPU machine): from the load call until the router routes to the worker, and drain-and-unload of
#: an idle worker until Triton lists it unloaded. A later run (worker_load_rerun.json) measured 9.2 s and 1.5 s;
#: the slower start-up is kept, the harder case for a planner.
MEASURED_STARTUP_S = 16.0
MEASURED_UNLOAD_S = 1.6
WORKLOADS = ("bursty", "mooncake", "shifting")


def synthetic_profile() -> PerformanceProfile:
    """A 7B-class model on one H100: prefill 25k tokens/s, slower as attention grows; decode memory-bound."""
    input_tokens = (512, 2048, 8192, 16384, 32768, 65536, 131072, 262144)
    batch_sizes = (1, 2, 4, 8)
    ttft = tuple(
        tuple(15.0 + 1000.0 * b * length * (1 + length / 65536) / 25000.0 for b in batch_sizes)
        for length in input_tokens
    )
    concurrency = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    context = (1024, 4096, 16384, 32768, 65536, 131072)
    itl = tuple(tuple(8.0 + 0.1 * c + c * ctx / 250_000.0 for ctx in context) for c in concurrency)
    return PerformanceProfile(
        model="synthetic-7b",
        device_kind="h100",
        devices_per_worker=1,
        prefill=PrefillProfile(tuple(map(float, input_tokens)), tuple(map(float, batch_sizes)), ttft),
        decode=DecodeProfile(tuple(map(float, concurrency)), tuple(map(float, context)), itl),
    )


def slowed(profile: PerformanceProfile, factor: float) -> PerformanceProfile:
    """The profile with every latency (prefill TTFT, decode ITL) `factor` times as long."""
    return replace(
        profile,
        prefill=replace(profile.prefill, ttft_ms=tuple(tuple(v * factor for v in row) for row in profile.prefill.ttft_ms)),
        decode=replace(profile.decode, itl_ms=tuple(tuple(v * factor for v in row) for row in profile.decode.itl_ms)),
    )


@dataclass(slots=True, frozen=True)
class Simulation:
    """What every policy of a run shares: the workers' speed and lifecycle, and the window measured."""

    #: The profile the simulated workers run at (the planners read `PerformanceProfile` they are given).
    worker_profile: PerformanceProfile
    startup_s: float
    unload_s: float
    warmup_s: float


def run_policy(arrivals: list[tuple[float, int, int]], sim: Simulation, config: PlannerConfig,
               planner: Planner | None, num_prefill: int, num_decode: int,
               timeline: Timeline) -> tuple[list[Request], float, int, int]:
    """Simulate one policy; returns the requests, device-seconds after the warm-up, peak devices and scale events."""
    budget = None if planner is None else config.device_budget
    cluster = Cluster(sim.worker_profile, config, sim.startup_s, num_prefill, num_decode, sim.unload_s, budget)
    requests = [Request(t, i, o) for t, i, o in arrivals]
    done: list[Request] = []
    interval_s = config.adjustment_interval_s
    end_s = requests[-1].arrival_s + DRAIN_S
    next_arrival, next_tick_s, now_s = 0, interval_s, 0.0
    interval_arrivals: list[Request] = []
    done_mark, max_devices, num_events = 0, num_prefill + num_decode, 0
    while now_s < end_s and len(done) < len(requests):
        while next_arrival < len(requests) and requests[next_arrival].arrival_s <= now_s:
            cluster.prefill_queue.append(requests[next_arrival])
            interval_arrivals.append(requests[next_arrival])
            next_arrival += 1
        cluster.step(now_s, done)
        now_s += STEP_S
        if now_s < next_tick_s:
            continue
        finished = done[done_mark:]
        done_mark = len(done)
        observation = cluster.observe(now_s, interval_s, interval_arrivals, finished, config.grace_period_s)
        if planner is not None:
            decision = planner.tick(observation, now_s)
            if decision.is_change:
                num_events += 1
                cluster.resize(cluster.prefill, decision.num_prefill_workers, now_s)
                cluster.resize(cluster.decode, decision.num_decode_workers, now_s)
        max_devices = max(max_devices, cluster.devices_held(now_s))
        timeline.at_s.append(now_s)
        timeline.num_prefill_workers.append(len(cluster.live(cluster.prefill)))
        timeline.num_decode_workers.append(len(cluster.live(cluster.decode)))
        timeline.num_devices.append(cluster.devices_held(now_s))
        timeline.ttft_p99_ms.append(observation.ttft_p99_ms)
        timeline.prompt_tokens_per_s.append(sum(r.input_tokens for r in interval_arrivals) / interval_s)
        timeline.output_tokens_per_s.append(sum(r.output_tokens for r in interval_arrivals) / interval_s)
        interval_arrivals = []
        next_tick_s += interval_s
    return requests, cluster.device_s(sim.warmup_s, now_s), max_devices, num_events


def static_split(arrivals: list[tuple[float, int, int]], profile: PerformanceProfile, config: PlannerConfig,
                 which: str) -> tuple[int, int]:
    """Pool sizes the SLO arithmetic (planner/sizing.py) gives for the busiest (`peak`) or the mean
    interval's load, each interval's rate and mean lengths known in hindsight; at least 1 each."""
    interval_s = config.adjustment_interval_s
    buckets: dict[int, list[tuple[float, int, int]]] = {}
    for arrival in arrivals:
        buckets.setdefault(int(arrival[0] // interval_s), []).append(arrival)
    sizes = []
    for rows in buckets.values():
        load = LoadForecast(
            prefill_tokens_per_s=sum(r[1] for r in rows) / interval_s,
            decode_tokens_per_s=sum(r[2] for r in rows) / interval_s,
            input_tokens=sum(r[1] for r in rows) / len(rows),
            output_tokens=sum(r[2] for r in rows) / len(rows),
        )
        sizes.append(tuple(max(1, math.ceil(need.num_workers - 1e-9))
                           for need in (prefill_need(profile, config, load), decode_need(profile, config, load))))
    if which == "peak":
        return max(p for p, _ in sizes), max(d for _, d in sizes)
    return (max(1, round(sum(p for p, _ in sizes) / len(sizes))), max(1, round(sum(d for _, d in sizes) / len(sizes))))


def evaluate(workload: str, arrivals: list[tuple[float, int, int]], profile: PerformanceProfile,
             base: PlannerConfig, sim: Simulation) -> tuple[list[PolicyResult], dict[str, Timeline]]:
    """Run every policy on `arrivals`; the planners and the static splits read `profile`.

    When the simulated workers do not run at `profile` (`sim.worker_profile`), each SLO policy also
    runs without its latency correction (`slo_<predictor>_uncorrected`).
    """
    policies: list[tuple[str, PlannerConfig | None, tuple[int, int]]] = []
    policies.append(("static_peak", None, static_split(arrivals, profile, base, "peak")))
    policies.append(("static_mean", None, static_split(arrivals, profile, base, "mean")))
    start = (base.min_prefill_workers, base.min_decode_workers)
    policies.append(("load", replace(base, policy=PlannerPolicy.LOAD), start))
    for predictor in PredictorKind:
        policies.append((f"slo_{predictor.value}", replace(base, predictor=predictor), start))
        if sim.worker_profile != profile:
            config = replace(base, predictor=predictor, latency_correction=False)
            policies.append((f"slo_{predictor.value}_uncorrected", config, start))
    results, timelines = [], {}
    static_peak_device_s = None
    for name, config, (num_prefill, num_decode) in policies:
        print(f"[simulate_planner] {workload}: {name} ({num_prefill} prefill + {num_decode} decode at start)", file=sys.stderr)
        timeline = Timeline()
        planner = Planner(config, profile) if config is not None else None
        requests, device_s, max_devices, num_events = run_policy(
            arrivals, sim, config or base, planner, num_prefill, num_decode, timeline)
        if static_peak_device_s is None:
            static_peak_device_s = device_s
        results.append(summarise(workload, name, requests, base, device_s, static_peak_device_s, max_devices,
                                 num_events, sim.warmup_s, None if config is None else config.device_budget, timeline))
        timelines[name] = timeline
    return results, timelines


def summarise(workload: str, policy: str, requests: list[Request], config: PlannerConfig, device_s: float,
              static_peak_device_s: float, max_devices: int, num_events: int, warmup_s: float,
              device_budget: int | None, timeline: Timeline) -> PolicyResult:
    """Latency figures of the requests that arrived after `warmup_s`; `slo_attainment_all_pct` counts all."""
    slo_all = sum(_meets_slo(r, config) for r in requests) * 100.0 / len(requests)
    requests = [r for r in requests if r.arrival_s >= warmup_s]
    ttfts = [(r.first_token_s - r.arrival_s) * 1000.0 if r.first_token_s is not None else math.inf for r in requests]
    itls = [r.itl_ms if r.finish_s is not None else math.inf for r in requests]
    ttft_ok = [t <= config.ttft_ms for t in ttfts]
    itl_ok = [t <= config.itl_ms for t in itls]
    n = len(requests)
    finite_itls = [t for r, t in zip(requests, itls) if r.output_tokens > 1]
    return PolicyResult(
        workload=workload,
        policy=policy,
        num_requests=n,
        slo_attainment_pct=100.0 * sum(a and b for a, b in zip(ttft_ok, itl_ok)) / n,
        slo_attainment_all_pct=slo_all,
        ttft_attainment_pct=100.0 * sum(ttft_ok) / n,
        itl_attainment_pct=100.0 * sum(itl_ok) / n,
        device_s=round(device_s, 1),
        device_s_vs_static_peak=round(device_s / static_peak_device_s, 3),
        max_devices=max_devices,
        device_budget=device_budget,
        prefill_changed=len(set(timeline.num_prefill_workers)) > 1,
        decode_changed=len(set(timeline.num_decode_workers)) > 1,
        ttft_p50_ms=round(percentile(ttfts, 0.5), 1),
        ttft_p99_ms=round(percentile(ttfts, 0.99), 1),
        itl_p50_ms=round(percentile(finite_itls, 0.5), 2),
        itl_p99_ms=round(percentile(finite_itls, 0.99), 2),
        num_scale_events=num_events,
    )


def _meets_slo(request: Request, config: PlannerConfig) -> bool:
    if request.first_token_s is None or request.finish_s is None:
        return False
    return (request.first_token_s - request.arrival_s) * 1000.0 <= config.ttft_ms and request.itl_ms <= config.itl_ms


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(f"TRITON_DISAGG_SIMULATE_{name.upper().replace('-', '_')}", default)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=Path(_env("trace", str(DEFAULT_TRACE))))
    parser.add_argument("--profile", type=Path, default=_env("profile", None), help="profile JSON; synthetic if unset")
    parser.add_argument("--ttft-ms", type=float, default=float(_env("ttft-ms", "3000")))
    parser.add_argument("--itl-ms", type=float, default=float(_env("itl-ms", "40")))
    parser.add_argument("--interval-s", type=float, default=float(_env("interval-s", "15")))
    parser.add_argument("--budget", type=int, default=int(_env("budget", "24")),
                        help="device budget of the planners on the bursty and mooncake workloads")
    parser.add_argument("--shifting-budget", type=int, default=int(_env("shifting-budget", "10")),
                        help="device budget of the planners on the shifting workload (both pools share it)")
    parser.add_argument("--startup-s", type=float, default=float(_env("startup-s", str(MEASURED_STARTUP_S))),
                        help="seconds from a worker's load call until it serves (default: measured on a real server)")
    parser.add_argument("--unload-s", type=float, default=float(_env("unload-s", str(MEASURED_UNLOAD_S))),
                        help="seconds a drained worker takes to unload, holding its device (default: measured)")
    parser.add_argument("--warmup-s", type=float, default=float(_env("warmup-s", "60")),
                        help="requests arriving before this are served but not counted, nor devices held before it")
    parser.add_argument("--headroom", type=float, default=float(_env("headroom", "0.4")),
                        help="capacity_headroom of the SLO policy and the static splits")
    parser.add_argument("--worker-slowdown", type=float, default=float(_env("worker-slowdown", "1")),
                        help="simulated workers take this many times the profile's latencies (the planners still "
                             "read the profile); other than 1, SLO policies also run uncorrected")
    parser.add_argument("--seed", type=int, default=int(_env("seed", "0")))
    parser.add_argument("--workloads", default=_env("workloads", ",".join(WORKLOADS)))
    parser.add_argument("--out", type=Path, default=Path(_env("out", str(REPO_ROOT / "results" / "simulate_planner"))))
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"--workloads: unknown workload(s) {', '.join(unknown)}; use any of {', '.join(WORKLOADS)}")
    if args.worker_slowdown <= 0:
        parser.error(f"--worker-slowdown must be > 0, got {args.worker_slowdown}")

    profile = PerformanceProfile.load(args.profile) if args.profile else synthetic_profile()
    sim = Simulation(slowed(profile, args.worker_slowdown) if args.worker_slowdown != 1 else profile,
                     args.startup_s, args.unload_s, args.warmup_s)
    base = PlannerConfig(
        policy=PlannerPolicy.SLO, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms, adjustment_interval_s=args.interval_s,
        device_kind=profile.device_kind, devices_per_prefill_worker=profile.devices_per_worker,
        devices_per_decode_worker=profile.devices_per_worker, grace_period_s=args.startup_s + args.interval_s,
        scale_down_cooldown_s=2 * args.interval_s, scale_down_window_s=2 * args.interval_s,
        capacity_headroom=args.headroom, worker_startup_s=args.startup_s, device_budget=args.budget,
        max_prefill_workers=args.budget - 1, max_decode_workers=args.budget - 1,
    )
    results: list[PolicyResult] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for workload in workloads:
        if workload == "bursty":
            arrivals = bursty_arrivals(args.seed)
        elif workload == "mooncake":
            arrivals = mooncake_arrivals(args.trace)
        else:
            arrivals = shifting_arrivals(args.seed)
        budget = args.shifting_budget if workload == "shifting" else args.budget
        config = replace(base, device_budget=budget, max_prefill_workers=budget - 1, max_decode_workers=budget - 1)
        workload_results, timelines = evaluate(workload, arrivals, profile, config, sim)
        results += workload_results
        plot(timelines, args.ttft_ms, budget, args.out.parent / f"{args.out.name}_{workload}.png",
             f"{workload} workload: load, pool sizes and TTFT p99 per interval")
    print_table(results)
    settings = {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "interval_s": args.interval_s, "budget": args.budget,
                "shifting_budget": args.shifting_budget, "startup_s": args.startup_s, "unload_s": args.unload_s,
                "warmup_s": args.warmup_s, "worker_slowdown": args.worker_slowdown, "seed": args.seed,
                "profile": str(args.profile or "synthetic"),
                "planner": {k: (v.value if hasattr(v, "value") else v) for k, v in _config_dict(base).items()}}
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, "results": [asdict(r) for r in results]}, indent=1) + "\n")
    print(f"[simulate_planner] wrote {args.out.with_suffix('.json')} and {args.out.name}_<workload>.png", file=sys.stderr)
    return 0


def _config_dict(config: PlannerConfig) -> dict:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


if __name__ == "__main__":
    sys.exit(main())
