"""Planner decision core: SLO arithmetic, budget, cooldown, grace, insufficient data, errors.

Numbers follow the hand-checkable profile of planner_factories.py.
"""

from __future__ import annotations

import pytest

from planner_factories import make_config, make_observation, make_planner, make_profile
from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.core import Planner
from triton_disagg.planner.observations import ScaleAction


# -- SLO policy -----------------------------------------------------------------------------


def test_slo_scale_up_from_profile_arithmetic():
    """4 req/s of 10900 input and 200 output tokens, TTFT 2000 ms, ITL 50 ms, no headroom.

    Prefill: TTFT at 10900 tokens is 545 * (b + 1) ms: 1090 (b=1), 1635 (b=2),
    2180 (b=3); the largest batch within 2000 ms is 2, at 13333.3 tokens/s.
    4 * 10900 = 43600 tokens/s / 13333.3 = 3.27 -> 4 workers.
    Decode: context 10900 + 200 / 2 = 11000, ITL 13 + 2c ms <= 50 -> c = 18 at 49 ms.
    In flight: 4 * 200 * 0.049 = 39.2 requests / 18 = 2.18 -> 3 workers.
    """
    decision = make_planner().tick(make_observation(), now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (4, 3)
    assert decision.prefill_action is ScaleAction.SCALE_UP
    assert decision.decode_action is ScaleAction.SCALE_UP
    assert decision.reason == "prefill=scale_up decode=scale_up"
    assert "batch 2" in decision.detail and "18 per worker" in decision.detail


def test_slo_headroom_adds_capacity():
    """Headroom 0.25: prefill 3.27 * 1.25 = 4.09 -> 5; decode 2.18 * 1.25 = 2.72 -> 3."""
    decision = make_planner(capacity_headroom=0.25).tick(make_observation(), now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (5, 3)


def test_slo_backlog_is_cleared_within_the_interval():
    """60000 prompt tokens pending over a 30 s interval add 2000 tokens/s:
    (43600 + 2000) / 13333.3 = 3.42 -> still 4; 400000 pending add 13333.3: 4.27 -> 5."""
    planner = make_planner(adjustment_interval_s=30.0)
    assert planner.tick(make_observation(prefill_queue_tokens=60000), now_s=0.0).num_prefill_workers == 4
    assert planner.tick(make_observation(prefill_queue_tokens=400000), now_s=30.0).num_prefill_workers == 5


def test_slo_scale_down_when_load_falls():
    """1 req/s: prefill 10900 / 13333.3 = 0.82 -> 1; decode 1 * 200 * 0.049 = 9.8 / 18 -> 1."""
    observation = make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=1.0)
    decision = make_planner().tick(observation, now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 1)
    assert decision.reason == "prefill=scale_down decode=scale_down"


def test_slo_itl_worse_than_profiled_tightens_the_decode_plan():
    """Decode runs 10 requests a worker; the profile says 13 + 2 * 10 = 33 ms, serving measures 66 ms:
    correction 2, so the profile is read at 50 / 2 = 25 ms: 13 + 2c <= 25 -> c = 6 at 25 ms, which
    serving turns into 2 * 25 = 50 ms. In flight: 4 * 200 * 0.050 = 40 requests / 6 = 6.67 -> 7 decode
    workers (3 uncorrected)."""
    observation = make_observation(itl_mean_ms=66.0, decode_running_requests=10.0)
    decision = make_planner(max_decode_workers=16, device_budget=32).tick(observation, now_s=0.0)
    assert decision.num_decode_workers == 7
    assert "ITL correction 2.00" in decision.detail and "6 per worker" in decision.detail
    uncorrected = make_planner(latency_correction=False).tick(observation, now_s=0.0)
    assert uncorrected.num_decode_workers == 3


def test_slo_ttft_better_than_profiled_lowers_the_prefill_plan_and_worse_does_not_raise_it():
    """The profile's TTFT for one 10900-token prompt is 10900 * 2 / 20 = 1090 ms. Serving measures 545 ms
    (prefix-cache hits): correction 0.5, need 3.27 * 0.5 = 1.635 -> 2 prefill workers (4 uncorrected).
    A measured 2180 ms with no prompt waiting at the ticks is queueing, not a slow profile: it stays at 4."""
    better = make_planner().tick(make_observation(ttft_mean_ms=545.0), now_s=0.0)
    assert better.num_prefill_workers == 2 and "x 0.50 prefill correction" in better.detail
    worse = make_planner().tick(make_observation(ttft_mean_ms=2180.0), now_s=0.0)
    assert worse.num_prefill_workers == 4 and "prefill correction" not in worse.detail


def test_slo_correction_is_bounded():
    """An ITL 100x the profile's (a stalled interval) counts as 4x: target 50 / 4 = 12.5 ms is below
    the profile's 15 ms at one request, so one request per worker at 4 * 15 = 60 ms:
    4 * 200 * 0.060 = 48 -> 48 workers (not 100x that)."""
    decision = make_planner(max_decode_workers=64, device_budget=128).tick(
        make_observation(itl_mean_ms=3300.0, decode_running_requests=10.0), now_s=0.0
    )
    assert "ITL correction 4.00" in decision.detail and decision.num_decode_workers == 48


def test_slo_aggregated_deployment_keeps_an_empty_prefill_pool():
    """max_prefill_workers 0: the 3.27 prefill workers the load needs are clipped to 0; decode still plans 3."""
    decision = make_planner(min_prefill_workers=0, max_prefill_workers=0).tick(
        make_observation(num_prefill_workers=0), now_s=0.0
    )
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (0, 3)
    assert decision.prefill_action is ScaleAction.HOLD


def test_slo_steady_when_pools_fit():
    decision = make_planner().tick(make_observation(num_prefill_workers=4, num_decode_workers=3), now_s=0.0)
    assert decision.reason == "prefill=steady decode=steady"
    assert not decision.is_change


def test_slo_zero_traffic_goes_to_minimum():
    """Rate 0 keeps the last known lengths and asks for 0 workers, clipped up to min 1 each."""
    planner = make_planner()
    planner.tick(make_observation(num_prefill_workers=4, num_decode_workers=3), now_s=0.0)
    idle = make_observation(num_prefill_workers=4, num_decode_workers=3, num_requests=0,
                            request_rate_per_s=0.0, mean_input_tokens=None, mean_output_tokens=None)
    decision = planner.tick(idle, now_s=30.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 1)


def test_max_per_pool_caps_the_ask():
    decision = make_planner(max_prefill_workers=2).tick(make_observation(), now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (2, 3)
    assert not decision.is_budget_clipped


# -- budget -----------------------------------------------------------------------------------


def test_budget_clipping_splits_in_proportion_to_need():
    """Asks 4 + 3 = 7 devices, budget 5: floor(4 * 5/7) = 2 and floor(3 * 5/7) = 2 use 4;
    the fifth goes to the pool furthest below its ask (prefill 2/4 < decode 2/3): 3 + 2."""
    decision = make_planner(device_budget=5).tick(make_observation(), now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (3, 2)
    assert decision.is_budget_clipped
    assert decision.reason == "prefill=scale_up decode=scale_up budget_clipped"


def test_budget_clipping_counts_devices_per_worker():
    """2-device workers, budget 8: asks 4 + 3 workers = 14 devices; floor(4 * 8/14) = 2 prefill,
    floor(3 * 8/14) = 1 decode use 6 devices; 2 left go to decode (1/3 < 2/4): 2 + 2 = 8 devices."""
    planner = make_planner(make_profile(devices_per_worker=2), device_budget=8,
                           devices_per_prefill_worker=2, devices_per_decode_worker=2)
    decision = planner.tick(make_observation(), now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (2, 2)
    assert decision.is_budget_clipped


def test_held_pool_leaves_the_growing_one_less_room():
    """Budget 6 on 1 prefill + 5 decode workers, one decode worker in grace. The ask, 4 prefill +
    3 decode = 7 devices, is clipped to floor(4 * 6/7) = 3 + floor(3 * 6/7) = 2, and the sixth
    device goes to decode (prefill 3/4 = 0.75 > decode 2/3): 3 + 3. Decode may not shrink while a
    worker is in grace, so it keeps 5 devices and prefill has 6 - 5 = 1: it cannot grow."""
    observation = make_observation(num_prefill_workers=1, num_decode_workers=5, num_decode_workers_in_grace=1)
    decision = make_planner(device_budget=6).tick(observation, now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 5)
    assert decision.reason == "prefill=budget_clipped decode=grace_period budget_clipped"


# -- cooldown and grace -----------------------------------------------------------------------


def test_cooldown_holds_scale_down_until_it_expires():
    """Up to 4 + 3 at t=0; at t=30 the ask is 1 + 1 but 30 s < the 120 s cooldown: hold.
    At t=120, 120 s have passed since the change: scale down."""
    planner = make_planner(scale_down_cooldown_s=120.0)
    planner.tick(make_observation(), now_s=0.0)
    low = make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=1.0)
    held = planner.tick(low, now_s=30.0)
    assert (held.num_prefill_workers, held.num_decode_workers) == (4, 3)
    assert held.reason == "prefill=cooldown decode=cooldown"
    released = planner.tick(low, now_s=120.0)
    assert (released.num_prefill_workers, released.num_decode_workers) == (1, 1)
    assert released.reason == "prefill=scale_down decode=scale_down"


def test_scale_up_cooldown():
    """Scale-up cooldown 60 s: grown at t=0, a bigger ask at t=30 waits, at t=60 it goes."""
    planner = make_planner(scale_up_cooldown_s=60.0)
    planner.tick(make_observation(), now_s=0.0)
    busier = make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=8.0)
    assert planner.tick(busier, now_s=30.0).prefill_reason == "cooldown"
    assert planner.tick(busier, now_s=60.0).prefill_reason == "scale_up"


def test_workers_in_grace_block_scale_down():
    """Two prefill workers are still in grace: prefill holds though 1 req/s needs 1; decode shrinks."""
    observation = make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=1.0,
                                   num_prefill_workers_in_grace=2)
    decision = make_planner().tick(observation, now_s=0.0)
    assert decision.reason == "prefill=grace_period decode=scale_down"
    assert decision.num_prefill_workers == 4


# -- insufficient data ------------------------------------------------------------------------


def test_slo_insufficient_data_until_enough_requests():
    """3 requests < min_requests_per_interval 5: no lengths yet, both pools hold; the next interval
    with 120 requests gives the 4 + 3 of the scale-up example."""
    planner = make_planner()
    decision = planner.tick(make_observation(num_requests=3), now_s=0.0)
    assert decision.reason == "prefill=insufficient_data decode=insufficient_data"
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 1)
    decision = planner.tick(make_observation(), now_s=30.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (4, 3)


# -- errors -----------------------------------------------------------------------------------


def test_slo_policy_without_profile_names_the_fix():
    with pytest.raises(ValueError, match="policy 'slo' needs profile data.*triton-disagg profile"):
        Planner(make_config(), None)


def test_profile_of_another_device_is_rejected():
    with pytest.raises(ValueError, match="device_kind 'h100'.*set device_kind='h100'"):
        Planner(make_config(), make_profile(device_kind="h100"))


def test_ticks_must_go_forward():
    planner = make_planner()
    planner.tick(make_observation(), now_s=30.0)
    with pytest.raises(ValueError, match="before the previous tick"):
        planner.tick(make_observation(), now_s=0.0)


# -- what the loop reports back, and corrections on thin data ----------------------------------


def test_a_change_that_was_not_applied_starts_no_cooldown():
    """Tick 1 wants prefill 1 -> 4 (SLO arithmetic above) with a 100 s scale-up cooldown. The loop
    could not load anything and reports the pools unchanged, so tick 2 asks again instead of
    waiting out a cooldown for a change that never happened. Without the report it is cooldown."""
    planner = make_planner(scale_up_cooldown_s=100.0)
    assert planner.tick(make_observation(), now_s=0.0).num_prefill_workers == 4
    planner.applied(num_prefill_workers=1, num_decode_workers=1)
    again = planner.tick(make_observation(), now_s=1.0)
    assert (again.prefill_reason, again.num_prefill_workers) == ("scale_up", 4)

    unreported = make_planner(scale_up_cooldown_s=100.0)
    unreported.tick(make_observation(), now_s=0.0)
    assert unreported.tick(make_observation(), now_s=1.0).prefill_reason == "cooldown"


def test_a_change_that_was_applied_keeps_its_cooldown():
    planner = make_planner(scale_up_cooldown_s=100.0)
    planner.tick(make_observation(), now_s=0.0)
    planner.applied(num_prefill_workers=4, num_decode_workers=3)
    assert planner.tick(make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=8.0), now_s=1.0).prefill_reason == "cooldown"


@pytest.mark.parametrize(
    "overrides",
    [
        {"itl_mean_ms": 66.0},  # no running batch to compare with
        {"itl_mean_ms": 66.0, "decode_running_requests": 0.0},
        {"itl_mean_ms": 66.0, "decode_running_requests": 10.0, "num_requests": 4},  # below min_requests_per_interval 5
    ],
)
def test_no_itl_correction_without_trustworthy_data(overrides):
    """Each case plans the uncorrected 3 decode workers of the first test (lengths learnt on a first tick)."""
    planner = make_planner()
    planner.tick(make_observation(), now_s=0.0)
    decision = planner.tick(make_observation(**overrides), now_s=1.0)
    assert decision.num_decode_workers == 3 and "ITL correction" not in decision.detail


def test_budget_fit_counts_prefill_devices_with_the_prefill_size():
    """2 prefill workers of 2 devices hold 4 of 6; decode workers take 1 device each, so a decode ask of 8
    fits 6 - 4 = 2 workers (counting prefill workers at the decode size would leave room for 4)."""
    planner = Planner(make_config(policy="load", devices_per_prefill_worker=2, device_budget=6, max_decode_workers=8))
    observation = make_observation(num_prefill_workers=2, num_decode_workers=1)
    assert planner._fit_budget(None, 8, observation) == (None, 2, True)
