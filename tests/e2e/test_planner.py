"""The planner process on a real server: load grows the pools, quiet shrinks them, no request is lost.

The load policy runs every 0.5 s with a low KV-usage band (grow above 25%
of a worker's 256 blocks, shrink below 5%). Six clients sending 300-token
requests hold about half of one worker's blocks, so the planner loads
decode_1; the router must then send it requests. Then one client sends short
requests, KV usage falls, and the planner drains and unloads decode_1 while
that client keeps going. Every request must succeed, the `llm` model's
counters must add up to exactly what the clients received, and every KV
block must come back. A short burst on the disaggregated server does the
same for both roles at once: prefill_1 and decode_1 loaded, then unloaded.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.launch.server import free_ports
from triton_disagg.cli.plan import PlanSettings, build_planner_loop
from triton_disagg.planner.process import PlannerLoop

pytestmark = pytest.mark.e2e

#: The recorded profile of the default model (`triton-disagg profile`).
PROFILE = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "planner" / "profile.json"

LLM_COUNTERS = (
    "triton_disagg_llm_requests_started_total",
    "triton_disagg_llm_input_tokens_total",
    "triton_disagg_llm_output_tokens_total",
    "triton_disagg_ttft_seconds_count",
    "triton_disagg_itl_seconds_count",
)


#: The timeouts below only bound a hang; on a loaded 2-core machine workers load slowly.
HANG_FACTOR = 3


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    timeout_s *= HANG_FACTOR
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


class Clients:
    """Client threads that send requests in a loop until stopped, keeping every result."""

    def __init__(self, client) -> None:
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=8)
        self.results: list[dict] = []
        self._lock = threading.Lock()
        self._stops: list[threading.Event] = []

    def start(self, num_clients: int, max_tokens: int, tag: str, padding: str = "") -> Callable[[], None]:
        """Start `num_clients` loops (prompts end with `padding`); returns a function that stops them
        and waits for their last requests."""
        stop = threading.Event()
        self._stops.append(stop)
        jobs = [self._pool.submit(self._loop, stop, f"{tag} client {i}", max_tokens, padding) for i in range(num_clients)]

        def finish() -> None:
            stop.set()
            for job in jobs:
                job.result()  # re-raises a failed request

        return finish

    def close(self) -> None:
        """Stop every loop (after a failure, too) and let their last requests end."""
        for stop in self._stops:
            stop.set()
        self._pool.shutdown(wait=True)

    def _loop(self, stop: threading.Event, name: str, max_tokens: int, padding: str) -> None:
        turn = 0
        while not stop.is_set():
            result = self._client.generate(
                text_input=f"{turn} {name}: tell me a story{padding}",
                max_tokens=max_tokens,
                ignore_eos=True,
                return_num_input_tokens=True,
                return_num_output_tokens=True,
            )
            with self._lock:
                self.results.append(result)
            turn += 1


def load_policy_loop(client, inventory: str, **overrides) -> PlannerLoop:
    """A planner loop (load policy) on `client`'s server, not started. New workers are in grace for 1 s
    and a pool may shrink 1 s after a change; it may not grow again for 60 s after one, so a late,
    stale report cannot grow a pool the test waits to see shrunk."""
    server = client.server
    config = PlannerConfig(
        **{"policy": "load", "scale_up_cooldown_s": 60.0, "scale_down_cooldown_s": 1.0, "grace_period_s": 1.0}
        | overrides
    )
    settings = PlanSettings(
        http_url=server.http_url,
        metrics_url=server.metrics_url,
        model_repository=Path(server.run_dir) / "model_repository",
        inventory=inventory,
        metrics_port=0,
    )
    return build_planner_loop(settings, config)


def llm_counters(client) -> dict[str, float]:
    counters = {name: sum(client.metric(name, missing_ok=True).values()) for name in LLM_COUNTERS}
    for outcome in ("success", "error", "cancelled"):
        counters[outcome] = sum(client.metric("triton_disagg_llm_requests_total", missing_ok=True, outcome=outcome).values())
    return counters


def test_planner_loads_a_decode_worker_under_load_and_unloads_it_when_quiet(one_decoder):
    loop = load_policy_loop(
        one_decoder,
        "cpu:3",
        adjustment_interval_s=0.5,
        min_prefill_workers=0,
        max_prefill_workers=1,
        min_decode_workers=1,
        max_decode_workers=2,
        device_budget=3,
        kv_usage_high=0.25,
        kv_usage_low=0.05,
        scale_down_window_s=1.0,
    )
    planner_url = f"http://localhost:{loop.metrics.serve(0)}/metrics"
    assert loop.connector.workers("decode") == ["decode_0"]
    assert loop.inventory.describe() == "cpu:0=decode_0 cpu:1=free cpu:2=free"
    before = llm_counters(one_decoder)
    served_before = one_decoder.metric("triton_disagg_requests_total", missing_ok=True)
    clients = Clients(one_decoder)
    stop_planner = threading.Event()
    planner = threading.Thread(target=loop.run, args=(stop_planner,), name="planner")
    started_s = time.monotonic()
    planner.start()
    try:
        finish_long = clients.start(num_clients=6, max_tokens=300, tag="long")
        wait_for(lambda: loop.connector.workers("decode") == ["decode_0", "decode_1"], 40, "the planner to load decode_1")
        assert loop.inventory.describe() == "cpu:0=decode_0 cpu:1=decode_1 cpu:2=free"

        def decode_1_served() -> bool:
            served = one_decoder.metric("triton_disagg_requests_total", missing_ok=True)
            return served.get("decode_1", 0) - served_before.get("decode_1", 0) > 0

        wait_for(decode_1_served, 40, "the router to send decode_1 requests")
        finish_long()

        finish_short = clients.start(num_clients=1, max_tokens=4, tag="short")
        wait_for(lambda: loop.connector.workers("decode") == ["decode_0"], 30, "the planner to unload decode_1")
        finish_short()
        # The tick that removes decode_1 ends (and sets the gauge) once Triton reports it unloaded.
        one_decode = 'triton_disagg_planner_actual_workers{pool="decode"} 1.0'
        wait_for(lambda: one_decode in requests.get(planner_url, timeout=5).text, 30, "the planner's tick to finish")
        planner_page = requests.get(planner_url, timeout=5).text
    finally:
        clients.close()
        stop_planner.set()
        planner.join()
        loop.metrics.close()
    timeline = [(round(d.at_s - started_s, 1), o.num_decode_workers, d.num_decode_workers) for o, d in loop.history]
    print(f"\n(s, decode workers, wanted) at each tick: {timeline}\n{len(clients.results)} requests")

    assert loop.inventory.describe() == "cpu:0=decode_0 cpu:1=free cpu:2=free"
    assert [r["finish_reason"] for r in clients.results] == ["length"] * len(clients.results)
    decisions = [decision for _, decision in loop.history]
    assert [d.num_decode_workers for d in decisions if d.is_change] == [2, 1]
    assert [d.decode_reason for d in decisions if d.is_change] == ["scale_up", "scale_down"]
    for series in (
        'triton_disagg_planner_decisions_total{pool="decode",reason="scale_up"} 1.0',
        'triton_disagg_planner_decisions_total{pool="decode",reason="scale_down"} 1.0',
        'triton_disagg_planner_actual_workers{pool="decode"} 1.0',
        'triton_disagg_planner_desired_workers{pool="decode"} 1.0',
    ):
        assert series in planner_page

    # The llm counters account for exactly what the clients received.
    num = len(clients.results)
    expected = {
        "triton_disagg_llm_requests_started_total": num,
        "triton_disagg_llm_input_tokens_total": sum(r["num_input_tokens"] for r in clients.results),
        "triton_disagg_llm_output_tokens_total": sum(r["num_output_tokens"] for r in clients.results),
        "triton_disagg_ttft_seconds_count": num,
        "triton_disagg_itl_seconds_count": sum(r["num_output_tokens"] - 1 for r in clients.results),
        "success": num,
        "error": 0,
        "cancelled": 0,
    }

    def counted() -> dict[str, float]:
        after = llm_counters(one_decoder)
        return {name: after[name] - before[name] for name in expected}

    wait_for(lambda: counted() == expected, 5, f"the llm counters to reach {expected} (last: {counted()})")

    total = one_decoder.total_blocks()["decode_0"]
    wait_for(lambda: one_decoder.free_blocks()["decode_0"] == total, 5, "decode_0's KV blocks to come back")


def test_plan_command_with_the_slo_policy_scales_decode_and_back(one_decoder, tmp_path):
    """`triton-disagg plan` as its own process, SLO policy on the recorded profile of the default model.

    An ITL target of 2 ms is below what the profile gives one request at these lengths (about 2.2 ms),
    so a decode worker takes one request at a time; with 200% headroom, six clients in a loop ask
    for more than one worker (about 6 req/s x 64 tokens x 2.2 ms x 3 = 2.5 in flight): the pool,
    capped at 2, grows. With no traffic the need is 0 and it shrinks back to 1.
    """
    server = one_decoder.server
    (planner_port,) = free_ports(1)
    command = [
        sys.executable, "-m", "triton_disagg.cli.main", "plan", "--policy", "slo", "--profile", str(PROFILE),
        "--http-url", server.http_url, "--metrics-url", server.metrics_url,
        "--model-repository", str(Path(server.run_dir) / "model_repository"), "--inventory", "cpu:3",
        "--planner-port", str(planner_port), "--interval-s", "1", "--ttft-ms", "5000", "--itl-ms", "2",
        "--capacity-headroom", "2", "--min-requests-per-interval", "1", "--grace-period-s", "1",
        "--scale-down-cooldown-s", "2", "--scale-down-window-s", "2", "--min-prefill-workers", "0", "--max-prefill-workers", "0",
        "--max-decode-workers", "2", "--device-budget", "3", "--predictor", "constant",
    ]  # fmt: skip
    log_path = tmp_path / "plan.log"
    clients = Clients(one_decoder)
    served_before = one_decoder.metric("triton_disagg_requests_total", missing_ok=True)
    with open(log_path, "wb") as log:
        planner = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    planner_url = f"http://localhost:{planner_port}/metrics"

    def actual_decode_workers() -> float | None:
        assert planner.poll() is None, log_path.read_text()
        try:
            page = requests.get(planner_url, timeout=2).text
        except requests.ConnectionError:
            return None
        match = re.search(r'^triton_disagg_planner_actual_workers\{pool="decode"\} (\S+)$', page, re.MULTILINE)
        return float(match.group(1)) if match else None

    try:
        wait_for(lambda: actual_decode_workers() == 1.0, 30, "the planner to start")
        finish = clients.start(num_clients=6, max_tokens=64, tag="slo")
        wait_for(lambda: actual_decode_workers() == 2.0, 60, "the SLO planner to load decode_1")

        def decode_1_served() -> bool:
            served = one_decoder.metric("triton_disagg_requests_total", missing_ok=True)
            return served.get("decode_1", 0) - served_before.get("decode_1", 0) > 0

        wait_for(decode_1_served, 40, "the router to send decode_1 requests")
        finish()
        wait_for(lambda: actual_decode_workers() == 1.0, 40, "the SLO planner to unload decode_1")
    finally:
        clients.close()
        planner.terminate()
        planner.wait(timeout=30)
    text = log_path.read_text()
    print(f"\n{len(clients.results)} requests; planner log:\n" + "\n".join(line[:160] for line in text.splitlines() if "decision" in line and "steady decode=steady" not in line))
    assert "loaded decode_1" in text and "drained and unloaded decode_1" in text
    assert [r["finish_reason"] for r in clients.results] == ["length"] * len(clients.results)
    total = one_decoder.total_blocks()["decode_0"]
    wait_for(lambda: one_decoder.free_blocks()["decode_0"] == total, 5, "decode_0's KV blocks to come back")


def test_a_burst_loads_a_prefill_and_a_decode_worker_and_quiet_unloads_both(disagg):
    """The load policy on the disaggregated server (prompts of 48 uncached tokens or more are prefilled
    on a prefill worker), every second. Prefill load is the interval's mean of the prompt tokens waiting
    or being prefilled (prompt tokens per second x mean TTFT): six clients sending ~110-token prompts
    keep it above 4 tokens per worker, so prefill grows; their 200-token requests hold about half of the
    decode worker's 256 KV blocks, past 25%, so decode grows. Both pools stop at their maximum, 2, and
    a 5 s scale-down window keeps them there through a quiet second. When the clients stop, no prompt
    arrives and no KV is held: both shrink back to 1, prefill_1 and decode_1 drained and unloaded
    through model control. No request may fail, and every KV block must come back."""
    loop = load_policy_loop(
        disagg,
        "cpu:4",
        adjustment_interval_s=1.0,
        min_prefill_workers=1,
        max_prefill_workers=2,
        min_decode_workers=1,
        max_decode_workers=2,
        device_budget=4,
        prefill_tokens_high=4,
        prefill_tokens_low=1,
        kv_usage_high=0.25,
        kv_usage_low=0.05,
        scale_down_window_s=5.0,
    )
    both = {pool: loop.connector.workers(pool) for pool in ("prefill", "decode")}
    assert both == {"prefill": ["prefill_0"], "decode": ["decode_0"]}
    before = llm_counters(disagg)
    served_before = disagg.metric("triton_disagg_requests_total", missing_ok=True)
    remote_before = sum(disagg.metric("triton_disagg_prefill_decisions_total", missing_ok=True, reason="remote").values())
    clients = Clients(disagg)
    stop_planner = threading.Event()
    planner = threading.Thread(target=loop.run, args=(stop_planner,), name="planner")
    planner.start()
    try:
        finish = clients.start(num_clients=6, max_tokens=200, tag="burst", padding=", " + "once upon a time " * 5)

        def pools() -> tuple[list[str], list[str]]:
            return loop.connector.workers("prefill"), loop.connector.workers("decode")

        wait_for(lambda: pools() == (["prefill_0", "prefill_1"], ["decode_0", "decode_1"]), 60,
                 "the planner to load prefill_1 and decode_1")

        def both_new_workers_served() -> bool:
            served = disagg.metric("triton_disagg_requests_total", missing_ok=True)
            return all(served.get(w, 0) - served_before.get(w, 0) > 0 for w in ("prefill_1", "decode_1"))

        wait_for(both_new_workers_served, 40, "the router to send prefill_1 and decode_1 requests")
        finish()
        wait_for(lambda: pools() == (["prefill_0"], ["decode_0"]), 40, "the planner to unload prefill_1 and decode_1")
    finally:
        clients.close()
        stop_planner.set()
        planner.join()
        loop.metrics.close()
    changes = [(d.num_prefill_workers, d.num_decode_workers, d.reason) for _, d in loop.history if d.is_change]
    print(f"\n{len(clients.results)} requests; changes: {changes}")

    assert [r["finish_reason"] for r in clients.results] == ["length"] * len(clients.results)
    remote = sum(disagg.metric("triton_disagg_prefill_decisions_total", missing_ok=True, reason="remote").values())
    assert remote - remote_before > 0  # the prompts were prefilled on prefill workers
    decisions = [d for _, d in loop.history if d.is_change]
    assert max(d.num_prefill_workers for d in decisions) == 2 and decisions[-1].num_prefill_workers == 1
    assert max(d.num_decode_workers for d in decisions) == 2 and decisions[-1].num_decode_workers == 1
    num = len(clients.results)
    after = llm_counters(disagg)
    assert after["triton_disagg_llm_requests_started_total"] - before["triton_disagg_llm_requests_started_total"] == num
    assert (after["success"] - before["success"], after["error"] - before["error"]) == (num, 0)
    for worker in ("prefill_0", "decode_0"):
        total = disagg.total_blocks()[worker]
        wait_for(lambda: disagg.free_blocks()[worker] == total, 10, f"{worker}'s KV blocks to come back")
