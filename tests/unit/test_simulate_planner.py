"""The planner simulator's decode accounting.

The flat profile prefills any batch in 20 ms and decodes at 10 ms a token, so
a request arriving at 0 s has its first token at 0.02 s (returned in the step
at 0.05 s) and its last at 0.02 + (output_tokens - 1) * 0.01 s: a mean ITL of
exactly 10 ms, however the 50 ms steps fall.
"""

from __future__ import annotations

import pytest

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.profile import DecodeProfile, PerformanceProfile, PrefillProfile
from triton_disagg.tools.planner_sim.cluster import STEP_S, Cluster, Request


def make_profile() -> PerformanceProfile:
    return PerformanceProfile(
        model="test-model",
        device_kind="cpu",
        devices_per_worker=1,
        prefill=PrefillProfile(input_tokens=(1000.0, 2000.0), batch_sizes=(1.0, 2.0), ttft_ms=((20.0, 20.0), (20.0, 20.0))),
        decode=DecodeProfile(concurrency=(1.0, 2.0), context_tokens=(1000.0, 2000.0), itl_ms=((10.0, 10.0), (10.0, 10.0))),
    )


def serve(request: Request, num_steps: int = 20) -> None:
    cluster = Cluster(make_profile(), PlannerConfig(), startup_s=0.0, num_prefill=1, num_decode=1)
    cluster.prefill_queue.append(request)
    done: list[Request] = []
    now_s = 0.0
    for _ in range(num_steps):
        cluster.step(now_s, done)
        now_s += STEP_S
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
    done: list[Request] = []
    now_s = 0.0
    for _ in range(10):
        cluster.step(now_s, done)
        now_s += STEP_S
    assert [r.finish_s for r in requests] == pytest.approx([0.11, 0.11, 0.24])
