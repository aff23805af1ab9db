"""Triton's metrics page to planner observations, on a page captured from a real server.

BEFORE is an excerpt of the page a server (one prefill and one decode worker)
served after two requests of 8 prompt tokens, which generated 5 and 9 tokens.
AFTER is the same page 5 s later, its numbers set so the interval works out by
hand: 10 requests started (12 - 2), 8 ended (success 9 + error 1 - 2), 1000
prompt tokens (1016 - 16), 2000 generated (2014 - 14), 10 first tokens in
2.0 s, 1992 later tokens in 1.992 s.
"""

from __future__ import annotations

import pytest

from triton_disagg.planner.scrape import LLMCounters, MetricsSnapshot, WorkerGauges, observe_interval, parse_metrics

BEFORE = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="decode_0",version="1"} 2
nv_inference_request_success{model="llm",version="1"} 2
# HELP triton_disagg_llm_requests_started_total Requests llm accepted and started relaying
# TYPE triton_disagg_llm_requests_started_total counter
triton_disagg_llm_requests_started_total{model="llm"} 2
# HELP triton_disagg_llm_requests_total Requests llm ended, by outcome (success, error, cancelled)
# TYPE triton_disagg_llm_requests_total counter
triton_disagg_llm_requests_total{model="llm",outcome="cancelled"} 0
triton_disagg_llm_requests_total{model="llm",outcome="error"} 0
triton_disagg_llm_requests_total{model="llm",outcome="success"} 2
# HELP triton_disagg_llm_input_tokens_total Prompt tokens of the requests llm accepted
# TYPE triton_disagg_llm_input_tokens_total counter
triton_disagg_llm_input_tokens_total{model="llm"} 16
# HELP triton_disagg_llm_output_tokens_total Tokens generated for the requests llm ended
# TYPE triton_disagg_llm_output_tokens_total counter
triton_disagg_llm_output_tokens_total{model="llm"} 14
# HELP triton_disagg_ttft_seconds_sum Sum of times to first token (accepted to first token), seconds
# TYPE triton_disagg_ttft_seconds_sum counter
triton_disagg_ttft_seconds_sum{model="llm"} 0.1481969640008174
# HELP triton_disagg_ttft_seconds_count Requests that reached their first token
# TYPE triton_disagg_ttft_seconds_count counter
triton_disagg_ttft_seconds_count{model="llm"} 2
# HELP triton_disagg_itl_seconds_sum Sum of the gaps between tokens after the first, seconds
# TYPE triton_disagg_itl_seconds_sum counter
triton_disagg_itl_seconds_sum{model="llm"} 0.04365811000025133
# HELP triton_disagg_itl_seconds_count Tokens after the first of each request
# TYPE triton_disagg_itl_seconds_count counter
triton_disagg_itl_seconds_count{model="llm"} 12
# HELP triton_disagg_requests_total Requests a worker finished (any outcome)
# TYPE triton_disagg_requests_total counter
triton_disagg_requests_total{model="prefill_0"} 0
triton_disagg_requests_total{model="decode_0"} 2
# HELP triton_disagg_kv_blocks KV blocks in the worker's pool
# TYPE triton_disagg_kv_blocks gauge
triton_disagg_kv_blocks{model="prefill_0"} 256
triton_disagg_kv_blocks{model="decode_0"} 256
# HELP triton_disagg_kv_free_blocks KV blocks that no request holds (cached prefix blocks included)
# TYPE triton_disagg_kv_free_blocks gauge
triton_disagg_kv_free_blocks{model="prefill_0"} 256
triton_disagg_kv_free_blocks{model="decode_0"} 256
# HELP triton_disagg_waiting_prompt_tokens Prompt tokens queued in the worker, not yet prefilled
# TYPE triton_disagg_waiting_prompt_tokens gauge
triton_disagg_waiting_prompt_tokens{model="prefill_0"} 0
triton_disagg_waiting_prompt_tokens{model="decode_0"} 0
# HELP triton_disagg_prefilling_tokens Prompt tokens of running requests not prefilled yet
# TYPE triton_disagg_prefilling_tokens gauge
triton_disagg_prefilling_tokens{model="prefill_0"} 0
triton_disagg_prefilling_tokens{model="decode_0"} 0
# HELP triton_disagg_running_requests Requests in the worker's running batch
# TYPE triton_disagg_running_requests gauge
triton_disagg_running_requests{model="prefill_0"} 0
triton_disagg_running_requests{model="decode_0"} 0
# HELP triton_disagg_waiting_requests Requests queued in the worker
# TYPE triton_disagg_waiting_requests gauge
triton_disagg_waiting_requests{model="prefill_0"} 0
triton_disagg_waiting_requests{model="decode_0"} 0
"""

#: BEFORE with more traffic, and decode_1 loaded; see the module docstring.
AFTER = (
    BEFORE.replace('started_total{model="llm"} 2', 'started_total{model="llm"} 12')
    .replace('outcome="error"} 0', 'outcome="error"} 1')
    .replace('outcome="success"} 2', 'outcome="success"} 9')
    .replace('input_tokens_total{model="llm"} 16', 'input_tokens_total{model="llm"} 1016')
    .replace('output_tokens_total{model="llm"} 14', 'output_tokens_total{model="llm"} 2014')
    .replace("0.1481969640008174", "2.1481969640008174")
    .replace('ttft_seconds_count{model="llm"} 2', 'ttft_seconds_count{model="llm"} 12')
    .replace("0.04365811000025133", "2.03565811000025133")
    .replace('itl_seconds_count{model="llm"} 12', 'itl_seconds_count{model="llm"} 2004')
    .replace('kv_free_blocks{model="prefill_0"} 256', 'kv_free_blocks{model="prefill_0"} 200')
    .replace('kv_free_blocks{model="decode_0"} 256', 'kv_free_blocks{model="decode_0"} 64\n'
             'triton_disagg_kv_free_blocks{model="decode_1"} 192')
    .replace('kv_blocks{model="decode_0"} 256', 'kv_blocks{model="decode_0"} 256\ntriton_disagg_kv_blocks{model="decode_1"} 256')
    .replace('waiting_prompt_tokens{model="prefill_0"} 0', 'waiting_prompt_tokens{model="prefill_0"} 1500')
    .replace('prefilling_tokens{model="prefill_0"} 0', 'prefilling_tokens{model="prefill_0"} 512')
    .replace('running_requests{model="decode_0"} 0', 'running_requests{model="decode_0"} 7\n'
             'triton_disagg_running_requests{model="decode_1"} 3')
    .replace('waiting_requests{model="decode_0"} 0', 'waiting_requests{model="decode_0"} 4\n'
             'triton_disagg_waiting_requests{model="decode_1"} 0')
)


def test_parse_reads_the_llm_counters_and_each_workers_gauges():
    snapshot = parse_metrics(BEFORE)
    assert snapshot.llm == LLMCounters(
        requests_started=2,
        requests_ended=2,
        input_tokens=16,
        output_tokens=14,
        ttft_sum_s=0.1481969640008174,
        ttft_count=2,
        itl_sum_s=0.04365811000025133,
        itl_count=12,
    )
    assert snapshot.workers == {
        "prefill_0": WorkerGauges(num_blocks=256, num_free_blocks=256),
        "decode_0": WorkerGauges(num_blocks=256, num_free_blocks=256),
    }


def test_an_interval_is_the_difference_of_two_pages():
    """10 started in 5 s: 2 req/s, 1000 / 10 = 100 prompt tokens, 2000 / 8 ended = 250 output tokens;
    TTFT 2.0 s / 10 = 200 ms, ITL 1.992 s / 1992 = 1 ms; prefill queue 1500 + 512 in flight;
    decode KV usage (1 - 64/256 + 1 - 192/256) / 2 = (0.75 + 0.25) / 2 = 0.5; running (7 + 3) / 2 = 5,
    waiting (4 + 0) / 2 = 2.
    """
    observation = observe_interval(
        parse_metrics(BEFORE), parse_metrics(AFTER), 5.0, ["prefill_0"], ["decode_0", "decode_1"],
        num_decode_workers_in_grace=1,
    )
    assert (observation.num_prefill_workers, observation.num_decode_workers) == (1, 2)
    assert observation.num_decode_workers_in_grace == 1
    assert observation.num_requests == 10
    assert observation.request_rate_per_s == 2.0
    assert observation.mean_input_tokens == 100.0
    assert observation.mean_output_tokens == 250.0
    assert observation.ttft_mean_ms == pytest.approx(200.0, rel=1e-12)
    assert observation.itl_mean_ms == pytest.approx(1.0, rel=1e-12)
    assert (observation.ttft_p50_ms, observation.ttft_p99_ms, observation.itl_p50_ms, observation.itl_p99_ms) == (None,) * 4
    assert (observation.prefill_queue_tokens, observation.active_prefill_tokens) == (1500, 512)
    assert observation.decode_kv_usage == 0.5
    assert (observation.decode_running_requests, observation.decode_waiting_requests) == (5.0, 2.0)


def test_a_quiet_interval_has_no_means():
    page = parse_metrics(BEFORE)
    observation = observe_interval(page, page, 2.0, ["prefill_0"], ["decode_0"])
    assert (observation.num_requests, observation.request_rate_per_s) == (0, 0.0)
    assert (observation.mean_input_tokens, observation.mean_output_tokens) == (None, None)
    assert (observation.ttft_mean_ms, observation.itl_mean_ms) == (None, None)
    assert observation.decode_kv_usage == 0.0


def test_a_counter_that_went_down_was_reset_and_counts_from_zero():
    """The llm model reloaded between the pages (AFTER then BEFORE): BEFORE's counts are all new,
    2 requests in 4 s of 16 / 2 = 8 prompt and 14 / 2 = 7 output tokens."""
    observation = observe_interval(parse_metrics(AFTER), parse_metrics(BEFORE), 4.0, [], ["decode_0"])
    assert (observation.num_requests, observation.request_rate_per_s) == (2, 0.5)
    assert (observation.mean_input_tokens, observation.mean_output_tokens) == (8.0, 7.0)


def test_one_counter_that_went_down_resets_all_llm_counters():
    """llm reloaded and served 3 requests of 500 prompt tokens before the second page: requests_started
    went down (12 to 3) but input_tokens went up (1016 to 1500). Every delta is the new value:
    3 requests in 2 s, 1500 / 3 = 500 prompt and 3000 / 2 = 1500 output tokens, TTFT 3.0 s / 3 = 1000 ms,
    ITL 2.5 s / 2500 = 1 ms (counter by counter it would be 484 / 3 prompt tokens and 1.0 s / 3 TTFT)."""
    before = MetricsSnapshot(llm=LLMCounters(
        requests_started=12, requests_ended=10, input_tokens=1016, output_tokens=2014,
        ttft_sum_s=2.0, ttft_count=12, itl_sum_s=2.0, itl_count=2004,
    ))
    after = MetricsSnapshot(llm=LLMCounters(
        requests_started=3, requests_ended=2, input_tokens=1500, output_tokens=3000,
        ttft_sum_s=3.0, ttft_count=3, itl_sum_s=2.5, itl_count=2500,
    ))
    observation = observe_interval(before, after, 2.0, [], [])
    assert (observation.num_requests, observation.request_rate_per_s) == (3, 1.5)
    assert (observation.mean_input_tokens, observation.mean_output_tokens) == (500.0, 1500.0)
    assert (observation.ttft_mean_ms, observation.itl_mean_ms) == (1000.0, 1.0)


def test_workers_without_a_report_yet_are_counted_but_not_averaged():
    """decode_1 is listed but has not published gauges: the mean KV usage is decode_0's alone;
    a prefill pool whose workers all lack reports has unknown load (None), an empty one has none (0)."""
    before, after = parse_metrics(BEFORE), parse_metrics(BEFORE.replace('kv_free_blocks{model="decode_0"} 256', 'kv_free_blocks{model="decode_0"} 192'))
    observation = observe_interval(before, after, 1.0, ["prefill_7"], ["decode_0", "decode_1"])
    assert observation.num_decode_workers == 2
    assert observation.decode_kv_usage == 0.25
    assert (observation.prefill_queue_tokens, observation.active_prefill_tokens) == (None, None)
    empty_pool = observe_interval(before, after, 1.0, [], ["decode_1"])
    assert (empty_pool.prefill_queue_tokens, empty_pool.active_prefill_tokens) == (0, 0)
    assert empty_pool.decode_kv_usage is None


def test_interval_must_be_positive():
    page = parse_metrics(BEFORE)
    with pytest.raises(ValueError, match="interval_s must be > 0, got 0"):
        observe_interval(page, page, 0, [], [])


def test_missing_llm_series_read_as_zero():
    assert parse_metrics("") == MetricsSnapshot(llm=LLMCounters(), workers={})
