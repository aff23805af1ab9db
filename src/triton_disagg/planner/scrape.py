"""Triton's metrics page to planner observations. Pure: text in, typed objects out.

A `MetricsSnapshot` is one scrape: the `llm` model's request counters and
each worker's gauges. Two snapshots and the seconds between them make an
`IntervalObservation`:

- `num_requests`, `request_rate_per_s`: requests `llm` accepted in the interval;
- `mean_input_tokens`: prompt tokens accepted / requests accepted;
- `mean_output_tokens`: tokens generated / requests ended (any outcome);
- `ttft_mean_ms`, `itl_mean_ms`: sum delta / count delta of the latency
  counters. Triton exports no percentiles here (its histograms crash the
  Python backend of Triton 2.51), so the `*_p50_ms`/`*_p99_ms` fields stay None;
- `prefill_queue_tokens`, `active_prefill_tokens`: summed over the prefill
  workers (0 with no prefill worker: decode workers then prefill themselves);
- `decode_kv_usage`: mean over the decode workers of (blocks - free) / blocks;
- `decode_running_requests`, `decode_waiting_requests`: mean over the decode
  workers of their running batch and of the requests queued for it.

If any `llm` counter went down, the `llm` model reloaded and all its counters
restarted from zero, including those that since climbed past their old value:
every `llm` delta of that interval is then the counter's new value (what
Prometheus' `increase()` takes for a reset counter), so sums and counts stay
paired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from triton_disagg.planner.observations import IntervalObservation

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? (\S+)", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True, frozen=True)
class LLMCounters:
    """The `llm` model's monotonic request counters (see src/triton_disagg/serving/llm_metrics.py)."""

    requests_started: float = 0.0
    requests_ended: float = 0.0
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0
    itl_sum_s: float = 0.0
    itl_count: float = 0.0


@dataclass(slots=True, frozen=True)
class WorkerGauges:
    """One worker's load at scrape time."""

    num_blocks: int
    num_free_blocks: int
    waiting_prompt_tokens: int = 0
    prefilling_tokens: int = 0
    running_requests: int = 0
    waiting_requests: int = 0

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass(slots=True, frozen=True)
class MetricsSnapshot:
    llm: LLMCounters
    #: By worker model name; only workers that reported their KV pool.
    workers: dict[str, WorkerGauges] = field(default_factory=dict)


_LLM_COUNTERS = {
    "triton_disagg_llm_requests_started_total": "requests_started",
    "triton_disagg_llm_requests_total": "requests_ended",
    "triton_disagg_llm_input_tokens_total": "input_tokens",
    "triton_disagg_llm_output_tokens_total": "output_tokens",
    "triton_disagg_ttft_seconds_sum": "ttft_sum_s",
    "triton_disagg_ttft_seconds_count": "ttft_count",
    "triton_disagg_itl_seconds_sum": "itl_sum_s",
    "triton_disagg_itl_seconds_count": "itl_count",
}
_WORKER_GAUGES = {
    "triton_disagg_kv_blocks": "num_blocks",
    "triton_disagg_kv_free_blocks": "num_free_blocks",
    "triton_disagg_waiting_prompt_tokens": "waiting_prompt_tokens",
    "triton_disagg_prefilling_tokens": "prefilling_tokens",
    "triton_disagg_running_requests": "running_requests",
    "triton_disagg_waiting_requests": "waiting_requests",
}


def parse_metrics(text: str) -> MetricsSnapshot:
    """Read the series the planner uses from a Prometheus text page; other series are ignored.

    Series of one name are summed over their other labels (e.g. `outcome`).
    """
    llm: dict[str, float] = {}
    workers: dict[str, dict[str, int]] = {}
    for name, label_text, value in _SAMPLE.findall(text):
        if name in _LLM_COUNTERS:
            key = _LLM_COUNTERS[name]
            llm[key] = llm.get(key, 0.0) + float(value)
        elif name in _WORKER_GAUGES:
            model = dict(_LABEL.findall(label_text or "")).get("model")
            if model is not None:
                workers.setdefault(model, {})[_WORKER_GAUGES[name]] = int(float(value))
    return MetricsSnapshot(
        llm=LLMCounters(**llm),
        workers={
            model: WorkerGauges(**gauges)
            for model, gauges in workers.items()
            if "num_blocks" in gauges and "num_free_blocks" in gauges
        },
    )


def observe_interval(
    previous: MetricsSnapshot,
    current: MetricsSnapshot,
    interval_s: float,
    prefill_workers: list[str],
    decode_workers: list[str],
    num_prefill_workers_in_grace: int = 0,
    num_decode_workers_in_grace: int = 0,
) -> IntervalObservation:
    """The interval between two scrapes `interval_s` apart, for the workers live at its end."""
    if interval_s <= 0:
        raise ValueError(f"interval_s must be > 0, got {interval_s}")
    now = current.llm
    was = LLMCounters() if _was_reset(previous.llm, now) else previous.llm
    started = now.requests_started - was.requests_started
    ended = now.requests_ended - was.requests_ended
    ttft_count = now.ttft_count - was.ttft_count
    itl_count = now.itl_count - was.itl_count
    prefill = [current.workers[w] for w in prefill_workers if w in current.workers]
    decode = [current.workers[w] for w in decode_workers if w in current.workers]
    has_prefill_report = bool(prefill) or not prefill_workers
    return IntervalObservation(
        num_prefill_workers=len(prefill_workers),
        num_decode_workers=len(decode_workers),
        num_requests=round(started),
        request_rate_per_s=started / interval_s,
        mean_input_tokens=_ratio(now.input_tokens - was.input_tokens, started),
        mean_output_tokens=_ratio(now.output_tokens - was.output_tokens, ended),
        num_prefill_workers_in_grace=num_prefill_workers_in_grace,
        num_decode_workers_in_grace=num_decode_workers_in_grace,
        ttft_mean_ms=_ratio((now.ttft_sum_s - was.ttft_sum_s) * 1000.0, ttft_count),
        itl_mean_ms=_ratio((now.itl_sum_s - was.itl_sum_s) * 1000.0, itl_count),
        prefill_queue_tokens=sum(w.waiting_prompt_tokens for w in prefill) if has_prefill_report else None,
        active_prefill_tokens=sum(w.prefilling_tokens for w in prefill) if has_prefill_report else None,
        decode_kv_usage=sum(w.kv_usage for w in decode) / len(decode) if decode else None,
        decode_running_requests=sum(w.running_requests for w in decode) / len(decode) if decode else None,
        decode_waiting_requests=sum(w.waiting_requests for w in decode) / len(decode) if decode else None,
    )


def _was_reset(was: LLMCounters, now: LLMCounters) -> bool:
    return any(getattr(now, f.name) < getattr(was, f.name) for f in fields(LLMCounters))


def _ratio(total: float, count: float) -> float | None:
    return total / count if count > 0 else None
