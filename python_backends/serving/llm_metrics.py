"""Request-level metrics of the `llm` entry model, on Triton's metrics endpoint.

Latency is measured where the client's stream starts: from the moment `llm`
accepted a request to its first token (TTFT), and between tokens after that
(ITL, one observation per response, spread over the tokens it carries).
Both `llm` instances feed the same series.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
#: How a request ended: a finish reason, or what cut it short.
OUTCOMES = ("stop", "length", "abort", "cancelled", "invalid", "error")


class LLMMetrics:
    def __init__(self) -> None:
        labels = {"model": "llm"}
        histogram, counter = pb_utils.MetricFamily.HISTOGRAM, pb_utils.MetricFamily.COUNTER
        self._families = [
            pb_utils.MetricFamily("triton_disagg_time_to_first_token_seconds", "Time to first token, seen by llm", histogram),
            pb_utils.MetricFamily("triton_disagg_inter_token_latency_seconds", "Time between tokens, seen by llm", histogram),
            pb_utils.MetricFamily("triton_disagg_llm_requests_total", "Requests llm finished, by outcome", counter),
            pb_utils.MetricFamily("triton_disagg_llm_input_tokens_total", "Prompt tokens of requests llm finished", counter),
            pb_utils.MetricFamily("triton_disagg_llm_output_tokens_total", "Tokens llm streamed to clients", counter),
        ]
        ttft, itl, requests, input_tokens, output_tokens = self._families
        self._ttft = ttft.Metric(labels=labels, buckets=TTFT_BUCKETS_S)
        self._itl = itl.Metric(labels=labels, buckets=ITL_BUCKETS_S)
        self._requests = {outcome: requests.Metric(labels=labels | {"outcome": outcome}) for outcome in OUTCOMES}
        self._input_tokens = input_tokens.Metric(labels=labels)
        self._output_tokens = output_tokens.Metric(labels=labels)
        self._lock = threading.Lock()

    def observe_ttft(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def count_request(self, outcome: str, num_input_tokens: int = 0, num_output_tokens: int = 0) -> None:
        with self._lock:
            self._requests[outcome].increment(1)
            if num_input_tokens:
                self._input_tokens.increment(num_input_tokens)
            if num_output_tokens:
                self._output_tokens.increment(num_output_tokens)
