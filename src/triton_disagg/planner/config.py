"""Typed settings of the planner.

One frozen object, validated on construction: a bad setting raises ValueError
naming the setting and how to fix it. Defaults run on a laptop (CPU workers,
one device each, a budget of 8 devices).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Device kinds a profile can be taken on and a worker pinned to.
KNOWN_DEVICE_KINDS: tuple[str, ...] = ("cpu", "a100", "h100", "h200", "b200", "l40s")


class PlannerPolicy(str, enum.Enum):
    """How the planner sizes the pools."""

    #: React to the prefill queue and the decode KV usage, with hysteresis.
    LOAD = "load"
    #: Predict the next interval's load and size the pools from profile data to meet TTFT and ITL targets.
    SLO = "slo"


class PredictorKind(str, enum.Enum):
    """How the SLO policy predicts the next interval's request rate and lengths."""

    #: The last interval's value.
    CONSTANT = "constant"
    #: The mean of the last `moving_average_window` intervals.
    MOVING_AVERAGE = "moving_average"
    #: Holt's double exponential smoothing: level plus trend.
    HOLT = "holt"
    #: A quantile (by default the maximum) of the last `quantile_window` intervals.
    QUANTILE = "quantile"


@dataclass(slots=True, frozen=True)
class PlannerConfig:
    """Targets, pool limits, budget, damping and prediction of the planner."""

    policy: PlannerPolicy = PlannerPolicy.SLO
    #: Time-to-first-token target, milliseconds (SLO policy).
    ttft_ms: float = 2000.0
    #: Inter-token latency target, milliseconds (SLO policy).
    itl_ms: float = 50.0
    #: Seconds between two ticks; observations cover one interval.
    adjustment_interval_s: float = 30.0
    min_prefill_workers: int = 1
    max_prefill_workers: int = 8
    min_decode_workers: int = 1
    max_decode_workers: int = 8
    #: Devices all workers together may hold.
    device_budget: int = 8
    #: Devices one prefill worker holds (tensor parallelism).
    devices_per_prefill_worker: int = 1
    #: Devices one decode worker holds.
    devices_per_decode_worker: int = 1
    #: Kind of device the workers run on; must match the profile's.
    device_kind: str = "cpu"
    #: Seconds after a pool changed before it may grow again.
    scale_up_cooldown_s: float = 0.0
    #: Seconds after a pool changed before it may shrink (longer than up: shrinking too early costs SLOs).
    scale_down_cooldown_s: float = 120.0
    #: Seconds a new worker is in grace: it counts toward its pool, but its pool is not shrunk,
    #: and the load policy does not grow it, since its metrics do not show the new capacity yet.
    grace_period_s: float = 30.0
    #: Seconds from a worker's load call until it serves (measure it: `python -m
    #: triton_disagg.tools.bench_worker_load`). The SLO policy sizes the pools for the peak load it
    #: predicts over this plus one interval: what a worker loaded now arrives in time for.
    worker_startup_s: float = 15.0
    #: A pool shrinks only to the largest size its policy asked for over this many seconds: load that
    #: dips for an interval or two does not cost a worker that would be loaded again right after.
    #: When the device budget is short, a shrinking pool gives its devices up at once to a growing one.
    scale_down_window_s: float = 60.0
    #: Load policy: prompt tokens waiting or being prefilled per prefill worker (the interval's mean,
    #: plus those queued at the tick) above which the pool grows.
    prefill_tokens_high: int = 32768
    #: Load policy: prompt tokens per prefill worker (the interval's mean) below which the pool shrinks.
    prefill_tokens_low: int = 4096
    #: Load policy: mean decode KV usage (0-1) above which the decode pool grows (requests queued for a
    #: slot in a worker's batch grow it too).
    kv_usage_high: float = 0.8
    #: Load policy: mean decode KV usage below which the decode pool may shrink.
    kv_usage_low: float = 0.3
    #: SLO policy: plan for this much more load than predicted (0.2: 20% spare).
    capacity_headroom: float = 0.2
    #: SLO policy: prefill workers planned beyond the load's need where the headroom adds fewer. A prompt
    #: holds its prefill worker until it is prefilled, so in a pool with no worker to spare every prompt
    #: behind a long one waits for it. (Decode workers interleave their requests and need no such spare.)
    prefill_spare_workers: int = 1
    predictor: PredictorKind = PredictorKind.QUANTILE
    #: Intervals averaged by the moving-average predictor.
    moving_average_window: int = 4
    #: Holt level smoothing (0-1]; higher follows the last interval more.
    holt_alpha: float = 0.6
    #: Holt trend smoothing (0-1].
    holt_beta: float = 0.4
    #: Intervals the quantile predictor looks back over.
    quantile_window: int = 6
    #: Quantile (0-1] of those intervals the quantile predictor forecasts; 1 is their maximum.
    quantile: float = 1.0
    #: Requests an interval needs before its mean lengths are trusted.
    min_requests_per_interval: int = 5
    #: SLO policy: correct the profile by the latency measured in serving (observed / profiled, as
    #: Dynamo's SLA planner does): a decode ITL worse than profiled tightens the ITL target the
    #: profile is read at and slows the tokens per worker by the same factor; a TTFT better than
    #: profiled (prefix-cache hits) lowers the prefill need.
    latency_correction: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", _enum(PlannerPolicy, self.policy, "policy"))
        object.__setattr__(self, "predictor", _enum(PredictorKind, self.predictor, "predictor"))
        for name in ("ttft_ms", "itl_ms", "adjustment_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}; set a positive value")
        for pool in ("prefill", "decode"):
            low = getattr(self, f"min_{pool}_workers")
            high = getattr(self, f"max_{pool}_workers")
            if low < 0:
                raise ValueError(f"min_{pool}_workers must be >= 0, got {low}")
            # A deployment may run aggregated (no prefill pool); it always needs a decode worker.
            floor = 1 if pool == "decode" else 0
            if high < max(low, floor):
                raise ValueError(
                    f"max_{pool}_workers ({high}) must be >= min_{pool}_workers ({low})"
                    f"{' and >= 1' if floor else ''}; raise max_{pool}_workers"
                )
            devices = getattr(self, f"devices_per_{pool}_worker")
            if devices < 1:
                raise ValueError(f"devices_per_{pool}_worker must be >= 1, got {devices}")
        if self.device_kind not in KNOWN_DEVICE_KINDS:
            raise ValueError(
                f"device_kind {self.device_kind!r} is unknown; use one of {', '.join(KNOWN_DEVICE_KINDS)}"
            )
        min_devices = self.devices_for(self.min_prefill_workers, self.min_decode_workers)
        if self.device_budget < min_devices:
            raise ValueError(
                f"device_budget ({self.device_budget}) is below the minimum pools' {min_devices} devices "
                f"({self.min_prefill_workers} prefill x {self.devices_per_prefill_worker} + "
                f"{self.min_decode_workers} decode x {self.devices_per_decode_worker}); "
                f"raise device_budget to >= {min_devices} or lower min_prefill_workers/min_decode_workers"
            )
        for name in ("scale_up_cooldown_s", "scale_down_cooldown_s", "grace_period_s", "worker_startup_s",
                     "scale_down_window_s", "capacity_headroom"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.prefill_tokens_low < self.prefill_tokens_high:
            raise ValueError(
                f"prefill_tokens_low ({self.prefill_tokens_low}) must be >= 0 and below prefill_tokens_high "
                f"({self.prefill_tokens_high}); the gap is the hysteresis band"
            )
        if not 0 <= self.kv_usage_low < self.kv_usage_high <= 1:
            raise ValueError(
                f"kv_usage_low ({self.kv_usage_low}) and kv_usage_high ({self.kv_usage_high}) must satisfy "
                f"0 <= low < high <= 1; the gap is the hysteresis band"
            )
        for name in ("moving_average_window", "quantile_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}; 1 forecasts the window's maximum")
        for name in ("holt_alpha", "holt_beta"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.prefill_spare_workers < 0:
            raise ValueError(f"prefill_spare_workers must be >= 0, got {self.prefill_spare_workers}")
        if self.min_requests_per_interval < 1:
            raise ValueError(f"min_requests_per_interval must be >= 1, got {self.min_requests_per_interval}")

    @property
    def horizon_intervals(self) -> float:
        """Intervals the SLO policy looks ahead: a worker's start-up plus one interval, in intervals."""
        return (self.worker_startup_s + self.adjustment_interval_s) / self.adjustment_interval_s

    def devices_for(self, num_prefill_workers: int, num_decode_workers: int) -> int:
        """Devices held by pools of these sizes."""
        return (
            num_prefill_workers * self.devices_per_prefill_worker
            + num_decode_workers * self.devices_per_decode_worker
        )


def _enum(kind: type[enum.Enum], value: object, name: str):
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(member.value for member in kind)
        raise ValueError(f"{name} {value!r} is unknown; use one of {choices}") from None
