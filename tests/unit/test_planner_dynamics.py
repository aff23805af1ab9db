"""The planner over several ticks: acting ahead, hysteresis, floors, one budget for two pools, corrections.

Numbers follow the hand-checkable profile of planner_factories.py: at 10900 prompt
tokens a prefill worker runs batches of 2 within the 2000 ms TTFT target, at
13333.3 tokens/s (a lone prompt takes 1090 ms); at context 11000 a decode worker
runs 18 requests within the 50 ms ITL target, at 49 ms.
"""

from __future__ import annotations

from planner_factories import make_observation, make_planner


def test_the_slo_policy_sizes_for_the_peak_predicted_before_a_new_worker_serves():
    """Holt (alpha = beta = 0.5) on 2 then 4 req/s: level 3, trend 0.5. With a 30 s start-up and 30 s
    interval it looks 2 intervals ahead: 3 + 2 x 0.5 = 4 req/s -> prefill 4 x 10900 / 13333.3 = 3.27 -> 4,
    decode 4 x 200 x 0.049 / 18 = 2.18 -> 3. Without start-up time, 1 interval: 3.5 req/s -> 2.86 -> 3 and
    1.91 -> 2."""
    sizes = {}
    for startup_s in (30.0, 0.0):
        planner = make_planner(predictor="holt", holt_alpha=0.5, holt_beta=0.5, worker_startup_s=startup_s)
        planner.tick(make_observation(request_rate_per_s=2.0), now_s=0.0)
        decision = planner.tick(make_observation(request_rate_per_s=4.0), now_s=30.0)
        sizes[startup_s] = (decision.num_prefill_workers, decision.num_decode_workers)
    assert sizes == {30.0: (4, 3), 0.0: (3, 2)}


def test_a_pool_shrinks_only_once_its_asks_stayed_low_for_the_window_and_then_all_at_once():
    """Window 60 s. t=0, 4 req/s: up to 4 + 3. From t=30 at 1 req/s the asks are 1 + 1 (0.82 and 0.54
    workers), but the ask of 4 + 3 at t=0 is within the window at t=30 and t=60: hold ("hysteresis").
    At t=90 it has left the window: both pools go to 1 in one step."""
    planner = make_planner(scale_down_window_s=60.0)
    assert planner.tick(make_observation(), now_s=0.0).reason == "prefill=scale_up decode=scale_up"
    quiet = make_observation(num_prefill_workers=4, num_decode_workers=3, request_rate_per_s=1.0)
    for now_s in (30.0, 60.0):
        decision = planner.tick(quiet, now_s=now_s)
        assert (decision.num_prefill_workers, decision.num_decode_workers) == (4, 3)
        assert decision.reason == "prefill=hysteresis decode=hysteresis"
    decision = planner.tick(quiet, now_s=90.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 1)
    assert decision.reason == "prefill=scale_down decode=scale_down"


def test_a_pool_never_shrinks_below_what_its_requests_in_flight_need():
    """1 req/s asks for 1 + 1, but 30000 prompt tokens are being prefilled: within the 2 s TTFT target
    that takes ceil(30000 / (13333.3 x 2)) = 2 prefill workers; 6 decode workers run 10 requests each:
    60 / 18 per worker -> 4."""
    observation = make_observation(num_prefill_workers=4, num_decode_workers=6, request_rate_per_s=1.0,
                                   active_prefill_tokens=30000, decode_running_requests=10.0)
    decision = make_planner(max_decode_workers=8).tick(observation, now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (2, 4)


def test_under_a_short_budget_a_shrinking_pool_gives_its_devices_to_the_growing_one_at_once():
    """Load policy, budget 6, scale-down window and cooldown 300 s. t=0: KV usage 0.9 on 4 decode workers
    (3.6 / 0.8 -> 5) grows decode to 5 next to 1 prefill worker: 6 devices. t=30: 100000 prompt tokens
    wait (-> 4 prefill workers) and decode load fell to 0.1 x 5 = 0.5 (-> 2). Decode would hold 5 for its
    window and cooldown, but the budget is short: it goes to 2 at once and prefill to 4. With devices to
    spare (budget 12) decode holds."""
    results = {}
    for budget in (6, 12):
        planner = make_planner(policy="load", device_budget=budget, scale_down_window_s=300.0,
                               scale_down_cooldown_s=300.0)
        planner.tick(make_observation(num_prefill_workers=1, num_decode_workers=4, decode_kv_usage=0.9), now_s=0.0)
        burst = make_observation(num_prefill_workers=1, num_decode_workers=5, prefill_queue_tokens=100000,
                                 decode_kv_usage=0.1)
        results[budget] = planner.tick(burst, now_s=30.0)
    assert (results[6].num_prefill_workers, results[6].num_decode_workers) == (4, 2)
    assert results[6].reason == "prefill=scale_up decode=scale_down"
    assert (results[12].num_prefill_workers, results[12].num_decode_workers) == (4, 5)
    assert results[12].decode_reason == "hysteresis"


def test_an_itl_correction_is_kept_through_an_interval_that_measures_none():
    """ITL 66 ms measured at 10 running requests where the profile says 33: correction 2, 7 decode workers
    (see test_slo_itl_worse_than_profiled_tightens_the_decode_plan). The next interval measures no ITL:
    the correction stays, and so do the 7 workers (3 uncorrected)."""
    planner = make_planner(max_decode_workers=16, device_budget=32)
    assert planner.tick(make_observation(itl_mean_ms=66.0, decode_running_requests=10.0), now_s=0.0).num_decode_workers == 7
    assert planner.tick(make_observation(num_decode_workers=7), now_s=30.0).num_decode_workers == 7


def test_a_saturated_prefill_pool_measures_its_throughput_and_corrects_a_profile_that_is_too_fast():
    """Two prefill workers with prompts waiting at both ticks (50000 then 20000 tokens) and a mean TTFT
    of 4000 ms, over 3 x the 1090 ms of a lone prompt: they prefilled all along. They got through
    1 req/s x 10900 + (50000 - 20000) / 30 = 11900 tokens/s where the profile says 2 x 13333.3 = 26666.7:
    correction 2.24. Need: (10900 + 20000 / 30) x 2.24 / 13333.3 = 1.94 -> 2 workers; uncorrected
    11566.7 / 13333.3 = 0.87 -> 1."""
    asks = {}
    for is_corrected in (True, False):
        planner = make_planner(latency_correction=is_corrected)
        planner.tick(make_observation(num_prefill_workers=2, request_rate_per_s=1.0, prefill_queue_tokens=50000), now_s=0.0)
        decision = planner.tick(make_observation(num_prefill_workers=2, request_rate_per_s=1.0, prefill_queue_tokens=20000,
                                                 ttft_mean_ms=4000.0), now_s=30.0)
        asks[is_corrected] = decision
    assert asks[True].num_prefill_workers == 2 and "x 2.24 prefill correction" in asks[True].detail
    assert asks[False].num_prefill_workers == 1


def test_a_spare_prefill_worker_where_the_headroom_adds_less():
    """1 req/s needs 10900 / 13333.3 = 0.82 prefill workers: with no headroom the spare makes it 1.82 -> 2.
    With 200% headroom, 0.82 x 3 = 2.45 is more than 0.82 + 1: 3."""
    assert make_planner(prefill_spare_workers=1).tick(make_observation(request_rate_per_s=1.0), now_s=0.0).num_prefill_workers == 2
    decision = make_planner(prefill_spare_workers=1, capacity_headroom=2.0).tick(make_observation(request_rate_per_s=1.0), now_s=0.0)
    assert decision.num_prefill_workers == 3
