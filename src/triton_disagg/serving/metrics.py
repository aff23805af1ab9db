"""Worker metrics on Triton's metrics endpoint (`pb_utils.MetricFamily`).

Gauges are set from engine snapshots; counters are fed the difference
between the engine's monotonic counters and what was already reported.
Families and metrics vanish from the server with their Python objects, so
this class keeps them all.
"""

from __future__ import annotations

import threading
from dataclasses import asdict

import triton_python_backend_utils as pb_utils

from triton_disagg.engine.llm_engine import LLMEngine

_GAUGES = {
    "triton_disagg_kv_blocks": "KV blocks in the worker's pool",
    "triton_disagg_kv_free_blocks": "KV blocks that no request holds (cached prefix blocks included)",
    "triton_disagg_kv_held_blocks": "KV blocks a prefill worker holds for decode workers to pull",
    "triton_disagg_running_requests": "Requests in the worker's running batch",
    "triton_disagg_waiting_requests": "Requests queued in the worker",
    "triton_disagg_waiting_prompt_tokens": "Prompt tokens queued in the worker, not yet prefilled",
    "triton_disagg_prefilling_tokens": "Prompt tokens of running requests not prefilled yet",
}
#: Handoff counters by `HandoffStats` field.
_HANDOFF_COUNTERS = {
    "holds_released": ("triton_disagg_kv_holds_total", {"outcome": "released"}),
    "holds_expired": ("triton_disagg_kv_holds_total", {"outcome": "expired"}),
    "pulls_done": ("triton_disagg_kv_pulls_total", {"outcome": "done"}),
    "pulls_fallback": ("triton_disagg_kv_pulls_total", {"outcome": "fallback"}),
    "blocks_pulled": ("triton_disagg_kv_blocks_pulled_total", {}),
    "blocks_reused_locally": ("triton_disagg_kv_blocks_reused_locally_total", {}),
}
_COUNTER_HELP = {
    "triton_disagg_kv_holds_total": "Prefill KV holds ended, by outcome (released by a decode worker, or expired)",
    "triton_disagg_kv_pulls_total": "Decode KV pulls ended, by outcome (done, or fallback to local prefill)",
    "triton_disagg_kv_blocks_pulled_total": "KV blocks a decode worker pulled from prefill workers",
    "triton_disagg_kv_blocks_reused_locally_total": "Prompt blocks a decode worker had cached and did not pull",
    "triton_disagg_prefill_decisions_total": "Where decode workers had prompts prefilled, by reason",
    "triton_disagg_requests_total": "Requests a worker finished (any outcome)",
    "triton_disagg_prompt_tokens_total": "Prompt tokens of the requests a worker finished",
    "triton_disagg_prefix_hit_tokens_total": "Prompt tokens a worker found in its prefix cache",
}


def metric_families(gauges: dict[str, str], counters: dict[str, str]) -> dict[str, "pb_utils.MetricFamily"]:
    """A Triton metric family per name (`{name: help text}`), gauges and counters; keep them alive while in use."""
    kinds = [(gauges, pb_utils.MetricFamily.GAUGE), (counters, pb_utils.MetricFamily.COUNTER)]
    return {
        name: pb_utils.MetricFamily(name=name, description=text, kind=kind)
        for family_help, kind in kinds
        for name, text in family_help.items()
    }


class WorkerMetrics:
    """One worker model's metrics, labelled `model=<name>`."""

    def __init__(self, model_name: str, engine: LLMEngine) -> None:
        self._engine = engine
        self._labels = {"model": model_name}
        self._families = metric_families(gauges=_GAUGES, counters=_COUNTER_HELP)
        self._gauges = {name: self._families[name].Metric(labels=self._labels) for name in _GAUGES}
        self._handoff = {
            field: self._families[family].Metric(labels=self._labels | extra)
            for field, (family, extra) in _HANDOFF_COUNTERS.items()
        }
        self._requests = {
            name: self._families[name].Metric(labels=self._labels)
            for name in ("triton_disagg_requests_total", "triton_disagg_prompt_tokens_total", "triton_disagg_prefix_hit_tokens_total")
        }
        self._decisions: dict[str, object] = {}
        self._reported: dict[str, int] = {}
        self._last_gauges: dict[str, float] = {}
        self._lock = threading.Lock()
        self._gauges["triton_disagg_kv_blocks"].set(engine.num_blocks)
        self.refresh()

    def refresh(self) -> None:
        """Publish the engine's current figures. Cheap when nothing changed (each set is an IPC)."""
        engine = self._engine
        stats = engine.stats()
        values = {
            "triton_disagg_kv_free_blocks": stats.num_free_blocks,
            "triton_disagg_kv_held_blocks": engine.handoff.num_held_blocks,
            "triton_disagg_running_requests": stats.num_running,
            "triton_disagg_waiting_requests": stats.num_waiting,
            "triton_disagg_waiting_prompt_tokens": stats.num_waiting_prompt_tokens,
            "triton_disagg_prefilling_tokens": stats.num_prefilling_tokens,
        }
        with self._lock:
            for name, value in values.items():
                if self._last_gauges.get(name) != value:
                    self._gauges[name].set(value)
                    self._last_gauges[name] = value
            for field, value in asdict(engine.handoff.stats).items():
                if field in self._handoff and value != self._reported.get(field, 0):
                    self._handoff[field].increment(value - self._reported.get(field, 0))
                    self._reported[field] = value

    def count_request(self, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """Count a finished request and how much of its prompt the prefix cache served."""
        with self._lock:
            self._requests["triton_disagg_requests_total"].increment(1)
            self._requests["triton_disagg_prompt_tokens_total"].increment(num_prompt_tokens)
            self._requests["triton_disagg_prefix_hit_tokens_total"].increment(num_cached_tokens)

    def count_decision(self, reason: str) -> None:
        """Count where a prompt was prefilled and why (`remote`, `local_short_prompt`, ...)."""
        with self._lock:
            if reason not in self._decisions:
                family = self._families["triton_disagg_prefill_decisions_total"]
                self._decisions[reason] = family.Metric(labels=self._labels | {"reason": reason})
            self._decisions[reason].increment(1)
