"""The load policy: grow to what the load needs, return in proportion, hysteresis band, grace.

Prefill load is the interval's mean of the prompt tokens waiting or being
prefilled (Little's law: request rate x mean prompt x mean TTFT), plus the
prompts queued at the tick to grow on; without a measured TTFT, the queued
and in-flight tokens at the tick. Decode load is KV usage in worker units,
and requests queued for a decode slot ask for the workers that would run them.
Default bands: prefill 4096-32768 tokens per worker, KV usage 0.3-0.8.
"""

from __future__ import annotations

from planner_factories import make_observation, make_planner


def test_a_burst_raises_each_pool_to_what_its_load_needs():
    """Prefill: 4 req/s x 10900 tokens x 0.5 s = 21800 tokens on average, plus 60000 queued = 81800 on
    2 workers = 40900 each > 32768 -> ceil(81800 / 32768) = 3 workers, not more.
    Decode: usage 0.9 on 4 workers = 3.6 workers of load / 0.8 = 4.5 -> 5."""
    observation = make_observation(num_prefill_workers=2, num_decode_workers=4, prefill_queue_tokens=60000,
                                   active_prefill_tokens=40000, ttft_mean_ms=500.0, decode_kv_usage=0.9)
    decision = make_planner(policy="load", device_budget=9).tick(observation, now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (3, 5)
    assert decision.reason == "prefill=scale_up decode=scale_up"


def test_quiet_load_returns_the_pools_in_proportion_not_one_worker_at_a_time():
    """Prefill: 1 req/s x 8000 tokens x 0.4 s = 3200 tokens on 6 workers = 533 each < 4096 ->
    ceil(3200 / 4096) = 1 worker. Decode: usage 0.1 on 4 workers = 0.4 / 0.3 -> ceil(1.33) = 2."""
    observation = make_observation(num_prefill_workers=6, num_decode_workers=4, request_rate_per_s=1.0,
                                   mean_input_tokens=8000.0, ttft_mean_ms=400.0, decode_kv_usage=0.1)
    decision = make_planner(policy="load").tick(observation, now_s=0.0)
    assert (decision.num_prefill_workers, decision.num_decode_workers) == (1, 2)
    assert decision.reason == "prefill=scale_down decode=scale_down"


def test_load_inside_the_band_holds():
    """4 req/s x 10900 x 0.3 s = 13080 tokens on 2 workers = 6540 each, inside 4096-32768;
    KV usage 0.5 is inside 0.3-0.8."""
    observation = make_observation(num_prefill_workers=2, num_decode_workers=2, ttft_mean_ms=300.0)
    assert make_planner(policy="load").tick(observation, now_s=0.0).reason == "prefill=steady decode=steady"


def test_without_a_measured_ttft_the_gauges_at_the_tick_count():
    """No first token in the interval: (60000 queued + 40000 in flight) / 2 = 50000 > 32768 ->
    ceil(100000 / 32768) = 4 (the queue counted once)."""
    observation = make_observation(num_prefill_workers=2, prefill_queue_tokens=60000, active_prefill_tokens=40000)
    assert make_planner(policy="load").tick(observation, now_s=0.0).num_prefill_workers == 4


def test_requests_queued_for_a_decode_slot_ask_for_the_workers_that_would_run_them():
    """KV usage 0.3 is in the band, but 2 workers each run 256 requests with 128 more queued:
    ceil(2 x (256 + 128) / 256) = 3 workers."""
    observation = make_observation(num_decode_workers=2, decode_kv_usage=0.3, decode_running_requests=256.0,
                                   decode_waiting_requests=128.0)
    decision = make_planner(policy="load").tick(observation, now_s=0.0)
    assert decision.num_decode_workers == 3 and "128 waiting per worker" in decision.detail


def test_no_growth_while_a_new_worker_is_in_grace():
    """Grace 60 s: prefill grows at t=0 (the gauges: 100000 / 2 > 32768 -> 4); at t=30 the load
    still looks high but the new workers are in grace: hold; at t=60 grace is over: 200000 / 32768 -> 7."""
    planner = make_planner(policy="load", grace_period_s=60.0)
    assert planner.tick(make_observation(num_prefill_workers=2, prefill_queue_tokens=100000), now_s=0.0).num_prefill_workers == 4
    still_busy = make_observation(num_prefill_workers=4, prefill_queue_tokens=200000)
    assert planner.tick(still_busy, now_s=30.0).prefill_reason == "grace_period"
    assert planner.tick(still_busy, now_s=60.0).num_prefill_workers == 7


def test_a_pool_without_its_gauges_holds_while_the_other_moves():
    observation = make_observation(num_prefill_workers=2, prefill_queue_tokens=100000, decode_kv_usage=None)
    decision = make_planner(policy="load").tick(observation, now_s=0.0)
    assert decision.reason == "prefill=scale_up decode=insufficient_data"


def test_an_empty_prefill_pool_stays_empty_while_decode_workers_prefill_their_prompts():
    """Aggregated: no prefill worker, so the prompts (and their TTFT) are the decode workers'. Nothing
    waits for a prefill worker: the pool stays at 0 (its minimum here, with room for 1)."""
    observation = make_observation(num_prefill_workers=0, ttft_mean_ms=500.0)
    decision = make_planner(policy="load", min_prefill_workers=0, max_prefill_workers=1).tick(observation, now_s=0.0)
    assert decision.num_prefill_workers == 0 and decision.prefill_reason == "steady"
