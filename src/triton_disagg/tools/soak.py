"""Soak: concurrent streams for minutes, with cancellations, disconnects and a worker killed and reloaded.

    python -m triton_disagg.tools.soak [--streams 8] [--minutes 5] [--output results/soak.json]

Starts a server (one prefill and two decode workers, remote prefill for
longer prompts) and runs `--streams` client loops against it. Each loop
sends streamed requests one after another: most run to their end, some are
cancelled by the client over gRPC, some are dropped by an HTTP client that
closes its connection. A third of the way in, decode_0's stub is killed
(SIGKILL; `--fault unload` unloads it instead); it is loaded again by the
stub supervisor `serve` runs (`--no-supervisor`: two thirds in). Then the load stops and the run
checks what the issue of a reliable server asks for:

- every request either completed (all its tokens, a finish reason) or was
  cancelled by its client: none lost (an error, a cut stream, a wrong count);
- every worker's KV pool is whole again once idle (free == total blocks);
- the server's memory (tritonserver and its stubs) at the start and the end.

It prints a table and writes JSON. `run_soak` is what the test suite calls
for its short version against a server it already runs.

Found with it: an `llm` stub that made its calls through BLS crashed
within minutes under this load (heap corruption inside Triton 2.51's Python
backend; see `serving.model_calls`), hanging its requests in flight. The
models now call one another over gRPC; the report still counts stubs that
died unasked in `crashed_stubs`.
"""

from __future__ import annotations

import argparse
import json
import queue
import random
import re
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from triton_disagg.launch.supervisor import StubSupervisor
from triton_disagg.model_control import ModelControl
from triton_disagg.tools.faults import kill_worker, stubs

CLOSE = {"Connection": "close"}


def progress(message: str) -> None:
    print(f"[soak] {message}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class SoakSettings:
    streams: int = 8
    duration_s: float = 300.0
    #: Fractions of requests the client cancels (gRPC) or walks away from (HTTP) mid-stream.
    cancel_fraction: float = 0.1
    disconnect_fraction: float = 0.1
    #: Take decode_0 away at this fraction of the run and load it again at `reload_at` (None: not again);
    #: `kill_at` None: no fault.
    kill_at: float | None = 1 / 3
    reload_at: float | None = 2 / 3
    worker: str = "decode_0"
    #: How the worker goes away: "kill" (SIGKILL of its stub) or "unload" (model control, requests in flight).
    fault: str = "kill"
    max_tokens: tuple[int, int] = (8, 64)
    seed: int = 0
    #: How long the pools may take to come back whole once the load stopped.
    settle_timeout_s: float = 60.0
    #: Run the stub supervisor as `serve` does (a model whose stub crashed is loaded again).
    supervise: bool = True


@dataclass(slots=True)
class SoakReport:
    streams: int
    duration_s: float
    completed: int = 0
    cancelled: int = 0
    migrated: int = 0
    lost: int = 0
    server_errors: int = 0
    #: Worker -> blocks not free once idle (0 for every worker: nothing leaked).
    leaked_blocks: dict[str, int] = field(default_factory=dict)
    rss_start_mib: float = 0.0
    rss_end_mib: float = 0.0
    killed: str | None = None
    #: Stubs that ended during the run and were not killed by it ("llm", ...): a crash.
    crashed_stubs: list[str] = field(default_factory=list)
    #: "Fatal Python error" reports in the server log during the run (a stub that crashed, at work or
    #: on its way out after an unload; SIGKILL leaves none).
    stub_faults: int = 0
    #: Models the supervisor loaded again during the run (the killed worker before its scheduled reload included).
    supervisor_reloads: list[str] = field(default_factory=list)
    #: One line per lost request: what went wrong.
    failures: list[str] = field(default_factory=list)


class SoakTarget:
    """One running server: its HTTP, gRPC and metrics endpoints, run directory and process group."""

    def __init__(self, http_url: str, grpc_url: str, metrics_url: str, run_dir: Path, server_pid: int) -> None:
        self.http_url, self.grpc_url, self.metrics_url = http_url, grpc_url, metrics_url
        self.run_dir, self.server_pid = Path(run_dir), server_pid

    def metric(self, name: str) -> dict[str, float]:
        text = requests.get(self.metrics_url, headers=CLOSE, timeout=10).text
        return {m: float(v) for m, v in re.findall(rf'^{name}\{{[^}}]*model="([^"]+)"[^}}]*\}} (\S+)$', text, re.MULTILINE)}

    def stub_faults(self) -> int:
        """How many "Fatal Python error" reports the server log holds (every stub enables faulthandler)."""
        log = self.run_dir / "tritonserver.log"
        return log.read_text(errors="replace").count("Fatal Python error") if log.is_file() else 0

    def rss_mib(self) -> float:
        """Resident memory of the server and its stubs (its process group), MiB."""
        total_pages = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                statm = (entry / "statm").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[2]) == self.server_pid:  # field 5: process group
                total_pages += int(statm.split()[1])
        return total_pages * 4096 / 2**20


def _stream_http(target: SoakTarget, prompt: str, max_tokens: int, disconnect_after: int | None) -> tuple[str, str]:
    """("completed" | "cancelled" | "lost", detail) of one HTTP generate_stream request."""
    body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "exclude_input_in_output": True, "return_num_output_tokens": True}  # fmt: skip
    num_events, last = 0, None
    with requests.post(f"{target.http_url}/v2/models/llm/generate_stream", json=body, headers=CLOSE, stream=True, timeout=120) as response:
        if response.status_code != 200:
            return "lost", f"HTTP {response.status_code}: {response.text[:200]}"
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            last = json.loads(line[6:])
            if "error" in last:
                return "lost", f"error event: {last['error'][:200]}"
            num_events += 1
            if disconnect_after is not None and num_events >= disconnect_after and last.get("finish_reason") is None:
                return "cancelled", "disconnected"
    if last is None or last.get("finish_reason") != "length" or last.get("num_output_tokens") != max_tokens:
        return "lost", f"stream ended with {last}"
    return "completed", ""


def _stream_grpc_cancelled(target: SoakTarget, prompt: str, max_tokens: int, cancel_after: int) -> tuple[str, str]:
    inputs = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "ignore_eos": np.array([True]),
        "stream": np.array([True]),
    }
    received: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(target.grpc_url)
    client.start_stream(callback=lambda result, error: received.put(error or result))
    tensors = []
    for name, array in inputs.items():
        tensors.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
        tensors[-1].set_data_from_numpy(array)
    try:
        client.async_stream_infer("llm", tensors)
        for _ in range(cancel_after):
            item = received.get(timeout=120)
            if not isinstance(item, grpcclient.InferResult):
                return "lost", f"gRPC error: {item}"
            if item.as_numpy("finish_reason") is not None:
                return "completed", ""
    except queue.Empty:
        return "lost", "gRPC stream stalled for 120 s"
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return "cancelled", "cancelled"


def _client_loop(target: SoakTarget, settings: SoakSettings, index: int, stop: threading.Event, report: SoakReport, lock: threading.Lock) -> None:
    rng = random.Random(settings.seed * 1000 + index)
    sequence = 0
    while not stop.is_set():
        sequence += 1
        # Some prompts long enough for a remote prefill, all sharing a prefix per loop.
        prompt = f"Soak loop {index} shares this prefix across its requests. " * rng.choice((1, 3)) + f"#{sequence}"
        max_tokens = rng.randint(*settings.max_tokens)
        roll = rng.random()
        try:
            if roll < settings.cancel_fraction:
                outcome, detail = _stream_grpc_cancelled(target, prompt, max_tokens, cancel_after=rng.randint(1, 4))
            elif roll < settings.cancel_fraction + settings.disconnect_fraction:
                outcome, detail = _stream_http(target, prompt, max_tokens, disconnect_after=rng.randint(1, 4))
            else:
                outcome, detail = _stream_http(target, prompt, max_tokens, None)
        except Exception as exc:  # noqa: BLE001 - a transport failure loses the request
            outcome, detail = "lost", f"{type(exc).__name__}: {exc}"
        with lock:
            setattr(report, outcome, getattr(report, outcome) + 1)
            if outcome == "lost":
                report.failures.append(detail)
                if detail.startswith("HTTP 5"):
                    report.server_errors += 1


def run_soak(target: SoakTarget, settings: SoakSettings) -> SoakReport:
    """Run the load with its faults against `target`; then settle and account. Never raises on a fault found."""
    report = SoakReport(streams=settings.streams, duration_s=settings.duration_s)
    migrations_before = sum(target.metric("triton_disagg_llm_migrations_total").values())
    report.rss_start_mib = target.rss_mib()
    faults_before = target.stub_faults()
    stubs_at_start = stubs(target.run_dir)
    stop, lock = threading.Event(), threading.Lock()
    threads = [
        threading.Thread(target=_client_loop, args=(target, settings, i, stop, report, lock), daemon=True)
        for i in range(settings.streams)
    ]
    started_s = time.monotonic()
    for thread in threads:
        thread.start()
    control = ModelControl(target.http_url)
    supervisor = StubSupervisor(target.http_url, target.run_dir) if settings.supervise else None

    def supervised_sleep_until(deadline_s: float) -> None:
        while (left_s := deadline_s - time.monotonic()) > 0:
            time.sleep(min(0.5, left_s))
            if supervisor is not None:
                report.supervisor_reloads += supervisor.check()

    if settings.kill_at is not None:
        supervised_sleep_until(started_s + settings.kill_at * settings.duration_s)
        if settings.fault == "kill":
            progress(f"killing {settings.worker} (SIGKILL of its stub)")
            kill_worker(target.run_dir, settings.worker)
        else:
            progress(f"unloading {settings.worker} under load")
            control.unload(settings.worker)
        report.killed = f"{settings.worker} ({settings.fault})"
    # Supervised, a killed worker is loaded again by the supervisor (as `serve` does) within a second.
    if settings.kill_at is not None and settings.reload_at is not None and not (supervisor and settings.fault == "kill"):
        supervised_sleep_until(started_s + settings.reload_at * settings.duration_s)
        progress(f"loading {settings.worker} again")
        control.load_worker(target.run_dir / "model_repository", settings.worker.rsplit("_", 1)[0], settings.worker)
    control.close()
    supervised_sleep_until(started_s + settings.duration_s)
    if supervisor is not None:
        supervisor.close()
    stop.set()
    progress("load stopped; waiting for the last requests")
    deadline_s = time.monotonic() + 180
    for thread in threads:
        thread.join(max(0.0, deadline_s - time.monotonic()))
        if thread.is_alive():  # its request never ended
            report.lost += 1
            report.failures.append("a request still unanswered 180 s after the load stopped")
    # Every stub that was running at the start and ended, but the one killed on purpose.
    report.crashed_stubs = sorted(
        model for pid, model in stubs_at_start.items() if pid not in stubs(target.run_dir) and model != settings.worker
    )
    report.stub_faults = target.stub_faults() - faults_before
    report.leaked_blocks = _settle(target, settings.settle_timeout_s)
    report.migrated = int(sum(target.metric("triton_disagg_llm_migrations_total").values()) - migrations_before)
    report.rss_end_mib = target.rss_mib()
    return report


def _settle(target: SoakTarget, timeout_s: float) -> dict[str, float]:
    """Blocks not free per worker, once they are all free or `timeout_s` passed."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        total, free = target.metric("triton_disagg_kv_blocks"), target.metric("triton_disagg_kv_free_blocks")
        leaked = {worker: int(total[worker] - free.get(worker, 0)) for worker in total}
        if not any(leaked.values()) or time.monotonic() > deadline_s:
            return leaked
        time.sleep(0.5)


def _sleep_until(deadline_s: float) -> None:
    time.sleep(max(0.0, deadline_s - time.monotonic()))


def print_table(report: SoakReport) -> None:
    rows = [
        ("streams", report.streams),
        ("minutes", f"{report.duration_s / 60:.1f}"),
        ("requests completed", report.completed),
        ("requests cancelled by their client", report.cancelled),
        ("requests migrated", report.migrated),
        ("requests lost", report.lost),
        ("HTTP 5xx", report.server_errors),
        ("worker taken away and reloaded", report.killed or "-"),
        ("stubs crashed", ", ".join(report.crashed_stubs) or "none"),
        ("fatal errors in stub logs", report.stub_faults),
        ("models the supervisor loaded again", ", ".join(report.supervisor_reloads) or "none"),
        *((f"blocks leaked, {worker}", blocks) for worker, blocks in sorted(report.leaked_blocks.items())),
        ("server RSS start / end (MiB)", f"{report.rss_start_mib:.0f} / {report.rss_end_mib:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    for failure in report.failures[:20]:
        print(f"lost: {failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=8, help="concurrent client loops")
    parser.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    parser.add_argument("--no-kill", action="store_true", help="run without killing a worker")
    parser.add_argument("--no-reload", action="store_true", help="take the worker away but do not load it again")
    parser.add_argument("--fault", choices=["kill", "unload"], default="kill", help="how decode_0 goes away midway")
    parser.add_argument("--no-supervisor", action="store_true", help="do not load again a model whose stub crashed")
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny default model)")
    parser.add_argument("--output", default="results/soak.json", help="JSON report to write")
    args = parser.parse_args(argv)

    from triton_disagg.launch.flags import default_model
    from triton_disagg.launch.server import ServerConfig, TritonServer, free_ports

    settings = SoakSettings(
        streams=args.streams,
        duration_s=args.minutes * 60,
        kill_at=None if args.no_kill else 1 / 3,
        reload_at=None if args.no_reload else 2 / 3,
        fault=args.fault,
        supervise=not args.no_supervisor,
    )
    http_port, grpc_port, metrics_port = free_ports(3)
    with tempfile.TemporaryDirectory(prefix="soak-") as run_dir:
        config = ServerConfig(
            model_path=Path(args.model) if args.model else default_model(),
            run_dir=Path(run_dir),
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            num_blocks=512,
            prefill_workers=1,
            decode_workers=2,
            min_remote_prefill_tokens=96,
            kv_hold_timeout_s=5.0,
            kv_pull_timeout_s=5.0,
            exit_timeout_s=2,
        )
        progress(f"starting a server in {run_dir}")
        with TritonServer(config) as server:
            target = SoakTarget(server.http_url, server.grpc_url, server.metrics_url, server.run_dir, server.pid)
            progress(f"{settings.streams} streams for {args.minutes:g} min")
            report = run_soak(target, settings)
    print_table(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": asdict(settings), "report": asdict(report)}, indent=2))
    print(f"wrote {output}")
    is_clean = not (
        report.lost or report.server_errors or report.crashed_stubs or report.stub_faults or any(report.leaked_blocks.values())
    )
    return 0 if is_clean else 1


if __name__ == "__main__":
    sys.exit(main())
