"""Request-level metrics of the `llm` entry model, on Triton's metrics endpoint.

Latency is measured where the client's stream starts. TTFT runs from the
moment `llm` accepted a request to its first token. ITL covers the responses
after the first token: each adds its gap since the previous tokens to the sum
and its number of tokens to the count, so each of its tokens counts that gap
divided among them. Tokens that come in the same response as the first one
count with no gap. So the count is each request's tokens after the first, the
sum the time from its first token to its last, and sum / count the mean time
per output token (TPOT) as vLLM and Dynamo define it. Both are exported as a pair of counters,
`_sum` and `_count`, so a scraper takes the mean over any interval from two
scrapes; Triton 2.51 crashed (SIGSEGV) with histograms observed from these
threads.

Relay threads only add to plain totals under a lock; one publisher thread
moves what accumulated to Triton every `publish_interval_s`. Metric calls are
IPCs to the server, so the relay path never waits on them and never makes
them from several threads at once. A call that fails is logged and what it
and the calls after it would have sent stays pending for the next round, so
the counters lag but lose nothing. Every `llm` instance publishes into the
same series (same name and labels), so the figures are the model's totals.

Each counter is its own call, so a scrape can land between two of them. Each
count is sent just before the total it divides (requests started, then their
prompt tokens; TTFT count, then sum; ITL count, then sum; requests ended, then
their output tokens), so the window is short, but a scrape may still see one
interval's count without its total: that interval's mean then reads low and
the next one's high.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, fields
from typing import Protocol

#: How a request ended: the worker finished it, it failed or was refused, or the client went away.
OUTCOMES = ("success", "error", "cancelled")

_COUNTERS = {
    "triton_disagg_llm_requests_started_total": "Requests llm accepted and started relaying",
    "triton_disagg_llm_requests_total": "Requests llm ended, by outcome (success, error, cancelled)",
    "triton_disagg_llm_input_tokens_total": "Prompt tokens of the requests llm accepted",
    "triton_disagg_llm_output_tokens_total": "Tokens generated for the requests llm ended",
    "triton_disagg_ttft_seconds_sum": "Sum of times to first token (accepted to first token), seconds",
    "triton_disagg_ttft_seconds_count": "Requests that reached their first token",
    "triton_disagg_itl_seconds_sum": "Sum of the gaps between responses after the first token, seconds",
    "triton_disagg_itl_seconds_count": "Tokens in the responses after the first token",
    "triton_disagg_llm_migrations_total": "Times a request moved to another decode worker after its worker failed",
}

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Totals:
    """Counts not yet published, in publish order: each count just before the total it divides."""

    requests_started: int = 0
    input_tokens: int = 0
    ttft_count: int = 0
    ttft_sum_s: float = 0.0
    itl_count: int = 0
    itl_sum_s: float = 0.0
    success: int = 0
    error: int = 0
    cancelled: int = 0
    output_tokens: int = 0
    migrations: int = 0

    def add(self, other: _Totals) -> None:
        for field in fields(_Totals):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class CounterSink(Protocol):
    """Where the publisher sends totals: one call per `_Totals` field with a non-zero increase.

    `field` is a `_Totals` field name, `value` > 0. May raise (a Triton metric
    call is an IPC); the publisher then keeps that value and the rest pending.
    """

    def increment(self, field: str, value: float) -> None: ...


class _TritonCounters:
    """The `llm` counters on Triton's metric API, labelled `model=llm`."""

    def __init__(self) -> None:
        # Imported here so that the accumulation and the publisher run (and are tested) without Triton.
        import triton_python_backend_utils as pb_utils

        labels = {"model": "llm"}
        counter = pb_utils.MetricFamily.COUNTER
        # Families and metrics vanish from the server with their Python objects: keep them.
        self._families = {name: pb_utils.MetricFamily(name=name, description=text, kind=counter) for name, text in _COUNTERS.items()}
        by_outcome = self._families["triton_disagg_llm_requests_total"]
        self._metrics = {
            "requests_started": self._families["triton_disagg_llm_requests_started_total"].Metric(labels=labels),
            "input_tokens": self._families["triton_disagg_llm_input_tokens_total"].Metric(labels=labels),
            "output_tokens": self._families["triton_disagg_llm_output_tokens_total"].Metric(labels=labels),
            "ttft_sum_s": self._families["triton_disagg_ttft_seconds_sum"].Metric(labels=labels),
            "ttft_count": self._families["triton_disagg_ttft_seconds_count"].Metric(labels=labels),
            "itl_sum_s": self._families["triton_disagg_itl_seconds_sum"].Metric(labels=labels),
            "itl_count": self._families["triton_disagg_itl_seconds_count"].Metric(labels=labels),
            "migrations": self._families["triton_disagg_llm_migrations_total"].Metric(labels=labels),
        } | {outcome: by_outcome.Metric(labels=labels | {"outcome": outcome}) for outcome in OUTCOMES}

    def increment(self, field: str, value: float) -> None:
        self._metrics[field].increment(value)


class LLMMetrics:
    """Counters of one `llm` instance, published to `sink` (Triton's, by default). Call `close()` last."""

    def __init__(self, publish_interval_s: float = 0.5, sink: CounterSink | None = None) -> None:
        self._sink = sink if sink is not None else _TritonCounters()
        self._pending = _Totals()
        self._lock = threading.Lock()
        self._publish_interval_s = publish_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llm-metrics", daemon=True)
        self._thread.start()

    def started(self, num_input_tokens: int) -> None:
        with self._lock:
            self._pending.requests_started += 1
            self._pending.input_tokens += num_input_tokens

    def first_token(self, ttft_s: float) -> None:
        with self._lock:
            self._pending.ttft_sum_s += ttft_s
            self._pending.ttft_count += 1

    def next_tokens(self, gap_s: float, num_tokens: int) -> None:
        """`num_tokens` more tokens arrived in one response, `gap_s` after the previous response."""
        with self._lock:
            self._pending.itl_sum_s += gap_s
            self._pending.itl_count += num_tokens

    def ended(self, outcome: str, num_output_tokens: int = 0) -> None:
        """Count a request that ended with `outcome` (one of OUTCOMES) after generating `num_output_tokens`."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
        with self._lock:
            setattr(self._pending, outcome, getattr(self._pending, outcome) + 1)
            self._pending.output_tokens += num_output_tokens

    def migrated(self) -> None:
        """Count a request that moved to another decode worker."""
        with self._lock:
            self._pending.migrations += 1

    def close(self) -> None:
        """Stop the publisher and publish what is left; raises what the sink raised."""
        self._stop.set()
        self._thread.join()
        self._publish()

    def _run(self) -> None:
        while not self._stop.wait(self._publish_interval_s):
            try:
                self._publish()
            except Exception:  # noqa: BLE001 - a dead publisher would freeze the counters the planner scales by
                logger.exception("publishing the llm metrics failed; retrying in %.1f s", self._publish_interval_s)

    def _publish(self) -> None:
        """Send the pending totals; on a failed call, it and the unsent rest stay pending, and it raises."""
        with self._lock:
            pending, self._pending = self._pending, _Totals()
        try:
            for field in fields(_Totals):
                value = getattr(pending, field.name)
                if value:
                    self._sink.increment(field.name, value)
                    setattr(pending, field.name, 0)
        finally:
            if any(getattr(pending, field.name) for field in fields(_Totals)):
                with self._lock:
                    self._pending.add(pending)
