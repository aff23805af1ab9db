"""MoE worker metrics on Triton's metrics port, and the expert-load snapshot a client can ask for.

Counters and gauges only (histograms crash Triton 2.51's Python backend).
Expert tokens are published per layer and logical expert while there are at
most `MAX_EXPERT_SERIES` of them per worker; a larger model is published per
expert summed over layers (`layer="all"`), so the series count stays bounded.
Publishing is throttled to once per `REFRESH_INTERVAL_S` (each value set is an
IPC to the server), and always happens when the engine goes idle.
"""

from __future__ import annotations

import threading
import time

from triton_disagg.engine.eplb_state import EplbState, ExpertLoadSnapshot
from triton_disagg.serving.metrics import metric_families

MAX_EXPERT_SERIES = 4096
REFRESH_INTERVAL_S = 1.0

_COUNTERS = {
    "triton_disagg_moe_expert_tokens_total": "Tokens routed to each logical expert (top-k assignments), by layer and expert",
    "triton_disagg_eplb_rearrangements_total": "Expert placements applied in full by the live balancer",
    "triton_disagg_eplb_rearrangement_seconds_total": "Seconds engine steps stalled on expert weight moves",
    "triton_disagg_eplb_moved_slots_total": "Physical expert slots whose expert changed in rearrangements",
}
_GAUGES = {
    "triton_disagg_eplb_balancedness": "Mean over max rank load of the expert load window under the current placement "
    "(stat=min or mean over layers; 1.0 with one rank)",
    "triton_disagg_eplb_max_step_stall_seconds": "The longest an engine step waited for one layer's expert weight move",
}


class MoeMetrics:
    """One MoE worker's expert-load metrics, labelled `model=<name>`; also keeps the latest snapshot."""

    def __init__(self, model_name: str, eplb: EplbState) -> None:
        self._eplb = eplb
        self._model_name = model_name
        self._labels = {"model": model_name}
        self._families = metric_families(gauges=_GAUGES, counters=_COUNTERS)
        self._metrics: dict[tuple, object] = {}
        self._reported: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self._last_refresh_s = float("-inf")
        self.snapshot: ExpertLoadSnapshot = eplb.snapshot()
        self._publish(self.snapshot)

    def refresh(self, force: bool = False) -> None:
        """On the engine thread, after a step: take a snapshot and publish it, at most once per interval unless `force`."""
        now_s = time.monotonic()
        if not force and now_s - self._last_refresh_s < REFRESH_INTERVAL_S:
            return
        self._last_refresh_s = now_s
        self.snapshot = self._eplb.snapshot()
        self._publish(self.snapshot)

    def dump(self) -> dict:
        """The latest snapshot as JSON-ready data, with the worker's name and balancer settings."""
        config = self._eplb.config
        settings = {
            "eplb_redundant_experts": config.eplb_redundant_experts,
            "eplb_interval": config.eplb_interval,
            "eplb_window": config.eplb_window,
            "eplb_threshold": config.eplb_threshold,
        }
        return {"model": self._model_name, **settings, **self.snapshot.to_json()}

    def _publish(self, snapshot: ExpertLoadSnapshot) -> None:
        stats = snapshot.stats
        with self._lock:
            for (layer, expert), total in snapshot.total_tokens_by_label(MAX_EXPERT_SERIES).items():
                self._set_counter("triton_disagg_moe_expert_tokens_total", total, layer=layer, expert=expert)
            self._set_counter("triton_disagg_eplb_rearrangements_total", stats.num_rearrangements)
            self._set_counter("triton_disagg_eplb_rearrangement_seconds_total", stats.rearrangement_s)
            self._set_counter("triton_disagg_eplb_moved_slots_total", stats.num_moved_slots)
            balancedness = snapshot.balancedness or [1.0]
            self._set_gauge("triton_disagg_eplb_balancedness", min(balancedness), stat="min")
            self._set_gauge("triton_disagg_eplb_balancedness", sum(balancedness) / len(balancedness), stat="mean")
            self._set_gauge("triton_disagg_eplb_max_step_stall_seconds", stats.max_stall_s)

    def _metric(self, name: str, labels: dict[str, str]):
        key = (name, *sorted(labels.items()))
        if key not in self._metrics:
            self._metrics[key] = self._families[name].Metric(labels=self._labels | labels)
        return key, self._metrics[key]

    def _set_counter(self, name: str, total: float, **labels: str) -> None:
        """Raise counter `name` to `total` (a monotonic figure of the engine)."""
        key, metric = self._metric(name, labels)
        increase = total - self._reported.get(key, 0)
        if increase > 0:
            metric.increment(increase)
            self._reported[key] = total

    def _set_gauge(self, name: str, value: float, **labels: str) -> None:
        key, metric = self._metric(name, labels)
        if self._reported.get(key) != value:
            metric.set(value)
            self._reported[key] = value

