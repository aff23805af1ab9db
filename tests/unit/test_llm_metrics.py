"""The `llm` counters' accumulation and publisher, on a sink that records (and sometimes refuses) calls."""

from __future__ import annotations

import threading

import pytest

from triton_disagg.serving.llm_metrics import LLMMetrics

#: Long enough that the publisher thread never wakes: `close()` does the one publish.
NEVER_S = 3600.0


class RecordingSink:
    """Records each increment; the call numbered `fail_on_call` (1-based) raises instead."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self.totals: dict[str, float] = {}
        self.has_published_after_failure = threading.Event()
        self._fail_on_call = fail_on_call
        self._num_calls = 0

    def increment(self, field: str, value: float) -> None:
        self._num_calls += 1
        if self._num_calls == self._fail_on_call:
            raise RuntimeError("metric IPC failed")
        self.calls.append((field, value))
        self.totals[field] = self.totals.get(field, 0) + value
        if self._fail_on_call is not None and self._num_calls > self._fail_on_call:
            self.has_published_after_failure.set()


def record_one_request(metrics: LLMMetrics) -> None:
    """8 prompt tokens; first token after 0.25 s; 3 more tokens in 0.5 s; ended with 4 tokens."""
    metrics.started(8)
    metrics.first_token(0.25)
    metrics.next_tokens(0.5, 3)
    metrics.ended("success", 4)


def test_each_count_is_published_just_before_the_total_it_divides():
    sink = RecordingSink()
    metrics = LLMMetrics(publish_interval_s=NEVER_S, sink=sink)
    record_one_request(metrics)
    metrics.close()
    assert sink.calls == [
        ("requests_started", 1),
        ("input_tokens", 8),
        ("ttft_count", 1),
        ("ttft_sum_s", 0.25),
        ("itl_count", 3),
        ("itl_sum_s", 0.5),
        ("success", 1),
        ("output_tokens", 4),
    ]


@pytest.mark.parametrize("fail_on_call", [1, 4])
def test_the_publisher_survives_a_failed_call_and_loses_nothing(fail_on_call, caplog):
    """The first call, or the fourth after three went through (ttft_sum_s when one round sends all), raises:
    the thread logs it, keeps what was unsent, and a later round sends it once, with nothing sent twice."""
    sink = RecordingSink(fail_on_call=fail_on_call)
    metrics = LLMMetrics(publish_interval_s=0.01, sink=sink)
    record_one_request(metrics)
    assert sink.has_published_after_failure.wait(10), "the publisher stopped after the failed call"
    metrics.close()
    assert sink.totals == {
        "requests_started": 1,
        "input_tokens": 8,
        "ttft_count": 1,
        "ttft_sum_s": 0.25,
        "itl_count": 3,
        "itl_sum_s": 0.5,
        "success": 1,
        "output_tokens": 4,
    }
    assert "publishing the llm metrics failed" in caplog.text
    assert "metric IPC failed" in caplog.text


def test_totals_accumulate_between_publishes():
    """Two requests, one refused: 2 started, 8 + 8 prompt tokens, 2 TTFTs of 0.25 s, 6 later tokens in 1.0 s."""
    sink = RecordingSink()
    metrics = LLMMetrics(publish_interval_s=NEVER_S, sink=sink)
    record_one_request(metrics)
    record_one_request(metrics)
    metrics.ended("error")
    metrics.close()
    assert sink.totals == {
        "requests_started": 2,
        "input_tokens": 16,
        "ttft_count": 2,
        "ttft_sum_s": 0.5,
        "itl_count": 6,
        "itl_sum_s": 1.0,
        "success": 2,
        "error": 1,
        "output_tokens": 8,
    }


def test_an_unknown_outcome_is_refused():
    metrics = LLMMetrics(publish_interval_s=NEVER_S, sink=RecordingSink())
    with pytest.raises(ValueError, match="outcome must be one of success, error, cancelled, got 'lost'"):
        metrics.ended("lost")
    metrics.close()
