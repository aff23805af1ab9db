"""The planner simulator: its worker model, its workloads, its report.

The flat profile prefills any batch in 20 ms and decodes at 10 ms a token, so
a request arriving at 0 s has its first token at 0.02 s (returned in the step
at 0.05 s) and its last at 0.02 + (output_tokens - 1) * 0.01 s: a mean ITL of
exactly 10 ms, however the 50 ms steps fall.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import pytest

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.profile import DecodeProfile, PerformanceProfile, PrefillProfile
from triton_disagg.tools.planner_sim.cluster import STEP_S, Cluster, Request
from triton_disagg.tools.planner_sim.workloads import shifting_arrivals
from triton_disagg.tools.simulate_planner import Simulation, evaluate, synthetic_profile


def make_profile() -> PerformanceProfile:
    return PerformanceProfile(
        model="test-model",
        device_kind="cpu",
        devices_per_worker=1,
        prefill=PrefillProfile(input_tokens=(1000.0, 2000.0), batch_sizes=(1.0, 2.0), ttft_ms=((20.0, 20.0), (20.0, 20.0))),
        decode=DecodeProfile(concurrency=(1.0, 2.0), context_tokens=(1000.0, 2000.0), itl_ms=((10.0, 10.0), (10.0, 10.0))),
    )


def advance(cluster: Cluster, now_s: float, num_steps: int, done: list[Request]) -> float:
    """Step `cluster` `num_steps` times from `now_s`; returns the time after the last step."""
    for _ in range(num_steps):
        cluster.step(now_s, done)
        now_s += STEP_S
    return now_s


def serve(request: Request, num_steps: int = 20) -> None:
    cluster = Cluster(make_profile(), PlannerConfig(), startup_s=0.0, num_prefill=1, num_decode=1)
    cluster.prefill_queue.append(request)
    done: list[Request] = []
    advance(cluster, 0.0, num_steps, done)
    assert done == [request]


@pytest.mark.parametrize("output_tokens", [2, 3, 6, 20])
def test_short_and_long_decodes_are_charged_their_itl_not_whole_steps(output_tokens: int) -> None:
    request = Request(arrival_s=0.0, input_tokens=1000, output_tokens=output_tokens)
    serve(request)
    assert request.first_token_s == pytest.approx(0.02)
    assert request.finish_s == pytest.approx(0.02 + (output_tokens - 1) * 0.01)
    assert request.itl_ms == pytest.approx(10.0)


def test_a_single_token_request_finishes_at_its_first_token() -> None:
    request = Request(arrival_s=0.0, input_tokens=1000, output_tokens=1)
    serve(request)
    assert request.finish_s == request.first_token_s
    assert request.itl_ms == 0.0


def test_a_decode_worker_runs_no_more_requests_than_the_profile_covers() -> None:
    """The profile stops at 2 concurrent requests: of three prefilled together, the third waits for
    a slot, so it starts decoding only when the first two finish at 0.02 + 9 * 0.01 = 0.11 s
    (the step at 0.15 s admits it) and ends 9 tokens later, at 0.15 + 0.09 = 0.24 s."""
    cluster = Cluster(make_profile(), PlannerConfig(), startup_s=0.0, num_prefill=1, num_decode=1)
    requests = [Request(arrival_s=0.0, input_tokens=500, output_tokens=10) for _ in range(3)]
    cluster.prefill_queue.extend(requests)
    advance(cluster, 0.0, 10, [])
    assert [r.finish_s for r in requests] == pytest.approx([0.11, 0.11, 0.24])


def test_under_a_device_budget_a_new_worker_waits_until_a_drained_one_has_unloaded() -> None:
    """Budget 2, held by prefill_0 and decode_0, which runs a 20-token request until 0.02 + 19 x 0.01
    = 0.21 s. At 0.10 s decode_0 is drained and a second prefill worker asked for: it waits for the
    device, which decode_0 frees once it has finished (the step at 0.20 s) and unloaded 0.12 s later,
    at 0.32 s; the step at 0.35 s loads the new worker, which serves from 0.35 + 1 s start-up."""
    cluster = Cluster(make_profile(), PlannerConfig(), startup_s=1.0, num_prefill=1, num_decode=1, unload_s=0.12,
                      device_budget=2)
    request = Request(arrival_s=0.0, input_tokens=1000, output_tokens=20)
    cluster.prefill_queue.append(request)
    done: list[Request] = []
    now_s = advance(cluster, 0.0, 2, done)
    cluster.resize(cluster.decode, 0, now_s)
    cluster.resize(cluster.prefill, 2, now_s)
    waiting = cluster.prefill[-1]
    assert cluster.devices_held(now_s) == 2 and waiting.loaded_at_s == math.inf
    now_s = advance(cluster, now_s, 6, done)
    assert request.finish_s == pytest.approx(0.21)
    assert (waiting.loaded_at_s, waiting.ready_at_s) == (pytest.approx(0.35), pytest.approx(1.35))
    assert cluster.devices_held(now_s) == 2


def test_the_shifting_workload_moves_its_load_from_decode_to_prefill_and_back() -> None:
    """Mean lengths of the phases' settled parts (blends left out): long outputs, then long prompts, then
    long outputs again."""
    arrivals = shifting_arrivals(seed=0)
    assert arrivals == sorted(arrivals) and arrivals == shifting_arrivals(seed=0)

    def means(from_s: float, to_s: float) -> tuple[float, float]:
        rows = [(i, o) for t, i, o in arrivals if from_s <= t < to_s]
        return sum(i for i, _ in rows) / len(rows), sum(o for _, o in rows) / len(rows)

    decode_bound, prefill_bound, decode_again = means(300, 840), means(900, 1440), means(1500, 2040)
    for inputs, outputs in (decode_bound, decode_again):
        assert inputs < 2000 and outputs > 2000
    assert prefill_bound[0] > 20000 and prefill_bound[1] < 150


def test_every_policy_reports_the_keys_the_recorded_results_use() -> None:
    """A minute of steady traffic through `evaluate`: one row per policy, static_peak the reference."""
    arrivals = [(0.2 * i, 2000, 50) for i in range(300)]
    config = PlannerConfig(ttft_ms=3000.0, itl_ms=40.0, adjustment_interval_s=15.0, device_kind="h100",
                           device_budget=8, max_prefill_workers=7, max_decode_workers=7)
    sim = Simulation(synthetic_profile(), startup_s=10.0, unload_s=1.0, warmup_s=0.0)
    results, timelines = evaluate("steady", arrivals, synthetic_profile(), config, sim)
    rows = {r.policy: asdict(r) for r in results}
    assert set(rows) == {"static_peak", "static_mean", "load", "slo_constant", "slo_moving_average", "slo_holt", "slo_quantile"}
    for row in rows.values():
        assert {"workload", "policy", "slo_attainment_pct", "device_s_vs_static_peak"} <= set(row)
        assert row["workload"] == "steady" and row["num_requests"] == 300
    assert rows["static_peak"]["device_s_vs_static_peak"] == 1.0
    assert set(timelines) == set(rows)
