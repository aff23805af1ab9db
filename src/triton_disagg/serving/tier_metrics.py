"""Per-tier KV cache metrics of one worker, labelled `model` and `tier` (device, host, disk).

Read from the engine after every step: the block manager's counters for
the device pool, `TieredKVCache.stats` for host memory and disk. A tier
that is off has no series. Counters are fed the increase since the last
refresh; only values that changed are sent (each set is an IPC).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.serving.metrics import metric_families

_GAUGES = {
    "triton_disagg_kv_tier_blocks": "KV blocks a tier holds (device: cached prefix blocks)",
    "triton_disagg_kv_tier_capacity_blocks": "KV blocks a tier can hold",
    "triton_disagg_kv_tier_hit_ratio": "Prompt blocks found in a tier over prompt blocks looked up, since start",
}
_COUNTERS = {
    "triton_disagg_kv_tier_offloaded_blocks_total": "KV blocks copied into a tier from the tier above (0 for device)",
    "triton_disagg_kv_tier_onboarded_blocks_total": "KV blocks brought back from a tier into the device pool (0 for device)",
    "triton_disagg_kv_tier_evicted_blocks_total": "KV blocks a tier dropped to make room",
    "triton_disagg_kv_tier_hit_blocks_total": "Prompt blocks found in a tier (the first in order holding them)",
    "triton_disagg_kv_tier_lookup_blocks_total": "Prompt blocks looked up in the prefix cache",
    "triton_disagg_kv_tier_bytes_total": "Bytes copied into (direction=in) or out of (direction=out) a tier",
    "triton_disagg_kv_tier_copy_seconds_total": "Seconds spent copying into or out of a tier",
    "triton_disagg_kv_tier_invalid_blocks_total": "Disk blocks found corrupt, truncated or foreign, dropped and recomputed",
    "triton_disagg_kv_tier_offload_wait_seconds_total": "Seconds the engine waited for an offload before reusing a device block",
}


@dataclass(slots=True, frozen=True)
class _Series:
    family: str
    labels: tuple[tuple[str, str], ...]
    read: Callable[[LLMEngine], float]


def _series(engine: LLMEngine) -> list[_Series]:
    """Every series this engine's tiers have, with how to read its value."""
    bm = engine.block_manager
    tiers = engine.tiers
    names = ["device"] + ([] if tiers is None else ["host"] + ([] if tiers.disk is None else ["disk"]))
    series: list[_Series] = []

    def add(family: str, read: Callable[[LLMEngine], float], **labels: str) -> None:
        series.append(_Series(family, tuple(sorted(labels.items())), read))

    add("triton_disagg_kv_tier_lookup_blocks_total", lambda e: e.block_manager.num_lookup_blocks)
    add("triton_disagg_kv_tier_blocks", lambda e: e.block_manager.num_cached_blocks, tier="device")
    add("triton_disagg_kv_tier_capacity_blocks", lambda e: e.num_blocks, tier="device")
    add("triton_disagg_kv_tier_evicted_blocks_total", lambda e: e.block_manager.num_evicted_blocks, tier="device")
    add("triton_disagg_kv_tier_hit_blocks_total", lambda e: e.block_manager.num_hit_blocks, tier="device")
    add("triton_disagg_kv_tier_hit_ratio", lambda e: _ratio(e.block_manager.num_hit_blocks, e), tier="device")
    for family in ("triton_disagg_kv_tier_offloaded_blocks_total", "triton_disagg_kv_tier_onboarded_blocks_total"):
        add(family, lambda e: 0, tier="device")
    if tiers is not None:
        add("triton_disagg_kv_tier_offload_wait_seconds_total", lambda e: e.tiers.stats.offload_wait_seconds)
    for name in names[1:]:
        tier = tiers.host if name == "host" else tiers.disk
        add("triton_disagg_kv_tier_blocks", lambda e, t=tier: t.num_resident, tier=name)
        add("triton_disagg_kv_tier_capacity_blocks", lambda e, t=tier: t.num_blocks, tier=name)
        for family, field in (
            ("triton_disagg_kv_tier_offloaded_blocks_total", "offloaded_blocks"),
            ("triton_disagg_kv_tier_onboarded_blocks_total", "onboarded_blocks"),
            ("triton_disagg_kv_tier_evicted_blocks_total", "evicted_blocks"),
            ("triton_disagg_kv_tier_hit_blocks_total", "onboarded_blocks"),
        ):
            add(family, lambda e, f=field, n=name: getattr(e.tiers.stats, f)[n], tier=name)
        add("triton_disagg_kv_tier_hit_ratio", lambda e, n=name: _ratio(e.tiers.stats.onboarded_blocks[n], e), tier=name)
        for direction in ("in", "out"):
            add("triton_disagg_kv_tier_bytes_total", lambda e, n=name, d=direction: getattr(e.tiers.stats, f"bytes_{d}")[n], tier=name, direction=direction)
            add("triton_disagg_kv_tier_copy_seconds_total", lambda e, n=name, d=direction: getattr(e.tiers.stats, f"seconds_{d}")[n], tier=name, direction=direction)
    if "disk" in names:
        add("triton_disagg_kv_tier_invalid_blocks_total", lambda e: e.tiers.stats.invalid_blocks, tier="disk")
    return series


def _ratio(num_hit_blocks: int, engine: LLMEngine) -> float:
    num_lookup = engine.block_manager.num_lookup_blocks
    return num_hit_blocks / num_lookup if num_lookup else 0.0


class TierMetrics:
    """The per-tier series of one worker. Call `refresh` on the engine thread; not thread-safe."""

    def __init__(self, model_name: str, engine: LLMEngine) -> None:
        self._engine = engine
        self._families = metric_families(gauges=_GAUGES, counters=_COUNTERS)
        self._series = _series(engine)
        self._metrics = [
            self._families[s.family].Metric(labels={"model": model_name, **dict(s.labels)}) for s in self._series
        ]
        self._reported: list[float] = [0.0] * len(self._series)
        self.refresh()

    def refresh(self) -> None:
        for i, (series, metric) in enumerate(zip(self._series, self._metrics)):
            value = series.read(self._engine)
            if value == self._reported[i]:
                continue
            if series.family in _GAUGES:
                metric.set(value)
            else:
                metric.increment(value - self._reported[i])
            self._reported[i] = value
