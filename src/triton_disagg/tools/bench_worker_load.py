"""How long the planner takes to add and to remove a worker on a real Triton server.

    python -m triton_disagg.tools.bench_worker_load [--repeats 3] [--model PATH] [--out results/bench_worker_load]

Starts one server (one prefill and one decode worker of the model) and, for
each role in turn, adds a worker and removes it again through the planner's
own `TritonConnector`, `--repeats` times:

- `load_s`: the model-control load call until the worker is READY (the
  connector's `add_worker`: template copy, config override, engine start);
- `routable_s`: from the same start until the router routes to the worker
  (it learns new workers from a repository poll, about once a second). This
  is a new worker's start-up as traffic sees it: `simulate_planner`'s
  `--startup-s`;
- `unload_s`: the connector's `remove_worker` on the idle worker: drain at
  the router, idle check, unload, until Triton lists it unloaded. The worker
  holds its device until then: `simulate_planner`'s `--unload-s`.

Prints a table, writes `<out>.json` with every sample, the medians and the
machine's load average while it ran; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from triton_disagg.model_control import RouterRefused, router_action
from triton_disagg.planner.connectors import POOLS, TritonConnector

REPO_ROOT = Path(__file__).resolve().parents[3]


def progress(message: str) -> None:
    print(f"[bench_worker_load] {message}", file=sys.stderr, flush=True)


def _wait_routable(http_url: str, name: str, timeout_s: float = 60.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            router_action(http_url, "inflight", name)
            return
        except RouterRefused:
            if time.monotonic() > deadline_s:
                raise TimeoutError(f"the router did not see {name} within {timeout_s:g} s") from None
            time.sleep(0.05)


def measure(connector: TritonConnector, http_url: str, pool: str) -> dict:
    """Add one worker to `pool` and remove it again; the three durations of the module docstring."""
    started_s = time.monotonic()
    name = connector.add_worker(pool)
    loaded_s = time.monotonic()
    _wait_routable(http_url, name)
    routable_s = time.monotonic()
    assert connector.remove_worker(pool) == name, f"removed a worker other than {name}"
    unloaded_s = time.monotonic()
    return {
        "pool": pool,
        "worker": name,
        "load_s": round(loaded_s - started_s, 3),
        "routable_s": round(routable_s - started_s, 3),
        "unload_s": round(unloaded_s - routable_s, 3),
    }


def summarise(samples: list[dict]) -> dict[str, dict[str, float]]:
    """Median and max of each duration, per pool and over both ("all")."""
    summary = {}
    for pool in (*POOLS, "all"):
        rows = [s for s in samples if pool in ("all", s["pool"])]
        summary[pool] = {
            f"{key}_{stat}": round(fn(r[key] for r in rows), 2)
            for key in ("load_s", "routable_s", "unload_s")
            for stat, fn in (("median", lambda v: statistics.median(list(v))), ("max", max))
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="adds and removes per role")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: a fresh tiny model)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench_worker_load")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")

    from triton_disagg.checkpoint import make_model
    from triton_disagg.launch.server import ServerConfig, TritonServer, free_ports

    samples: list[dict] = []
    load_averages: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or make_model(Path(scratch) / "tiny-llama")
        http_port, grpc_port, metrics_port = free_ports(3)
        config = ServerConfig(
            model_path=model, run_dir=Path(scratch) / "run", http_port=http_port, grpc_port=grpc_port,
            metrics_port=metrics_port, prefill_workers=1, decode_workers=1, exit_timeout_s=2,
        )
        progress("starting Triton with prefill_0 and decode_0")
        with TritonServer(config) as server:
            connector = TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository")
            for repeat in range(args.repeats):
                for pool in POOLS:
                    load_averages.append(os.getloadavg()[0])
                    sample = measure(connector, server.http_url, pool)
                    samples.append(sample)
                    progress(f"{repeat + 1}/{args.repeats} {sample}")
    summary = summarise(samples)
    results = {
        "model": str(args.model or "tiny-llama (triton-disagg make-model)"),
        "cpu_count": os.cpu_count(),
        "load_average_1m": [round(x, 2) for x in load_averages],
        "samples": samples,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'pool':8} {'load s':>14} {'routable s':>14} {'unload s':>14}   (median / max)")
    for pool, row in summary.items():
        cells = [f"{row[f'{key}_median']:6.2f} / {row[f'{key}_max']:5.2f}" for key in ("load_s", "routable_s", "unload_s")]
        print(f"{pool:8} " + " ".join(f"{cell:>14}" for cell in cells))
    progress(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
