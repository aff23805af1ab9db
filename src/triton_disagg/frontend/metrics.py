"""The frontend's Prometheus metrics (GET /metrics), measured where clients feel them.

    triton_disagg_frontend_requests_total{endpoint, status}   requests answered, by HTTP status
    triton_disagg_frontend_errors_total{endpoint, type}        error responses, by OpenAI error type
    triton_disagg_frontend_requests_in_flight{endpoint}        requests being served now
    triton_disagg_frontend_time_to_first_token_seconds         request arrival to first text (histogram)
    triton_disagg_frontend_inter_token_latency_seconds         time per output token after the first (histogram)
    triton_disagg_frontend_request_duration_seconds            arrival to last byte (histogram)
    triton_disagg_frontend_prompt_tokens_total                 prompt tokens of finished requests
    triton_disagg_frontend_completion_tokens_total             tokens generated for finished requests
    triton_disagg_frontend_request_finish_total{reason}        finished requests by finish reason
                                                               (stop, length, cancelled)
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

# The *_created series double the page for nothing a dashboard or the planner reads.
disable_created_metrics()

PREFIX = "triton_disagg_frontend"
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class FrontendMetrics:
    """One registry per app, so tests can run several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Requests answered, by HTTP status", ["endpoint", "status"], registry=r)
        self.errors = Counter(f"{PREFIX}_errors", "Error responses, by OpenAI error type", ["endpoint", "type"], registry=r)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being served", ["endpoint"], registry=r)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Arrival to first text", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time per output token after the first", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds", "Arrival to last byte", buckets=_LATENCY_BUCKETS_S, registry=r
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "Tokens generated", registry=r)
        self.finished = Counter(f"{PREFIX}_request_finish", "Finished requests by finish reason", ["reason"], registry=r)


class RequestTimer:
    """Times one generation: TTFT at the first token, ITL over the tokens after it."""

    def __init__(self, metrics: FrontendMetrics) -> None:
        self._metrics = metrics
        self.start_s = time.perf_counter()
        self._first_token_s: float | None = None
        self._last_s = self.start_s
        self._num_tokens = 0

    def on_tokens(self, num_output_tokens: int) -> None:
        """Called with the cumulative output token count at each delta."""
        now = time.perf_counter()
        new = num_output_tokens - self._num_tokens
        if new <= 0:
            return
        if self._first_token_s is None:
            self._first_token_s = now
            self._metrics.ttft.observe(now - self.start_s)
            new -= 1  # the rest of this delta's tokens came at once
            if new:
                for _ in range(new):
                    self._metrics.itl.observe(0.0)
        else:
            per_token_s = (now - self._last_s) / new
            for _ in range(new):
                self._metrics.itl.observe(per_token_s)
        self._last_s = now
        self._num_tokens = num_output_tokens

    def finish(self, reason: str, num_prompt_tokens: int) -> None:
        self._metrics.duration.observe(time.perf_counter() - self.start_s)
        self._metrics.finished.labels(reason).inc()
        self._metrics.prompt_tokens.inc(num_prompt_tokens)
        self._metrics.completion_tokens.inc(self._num_tokens)
