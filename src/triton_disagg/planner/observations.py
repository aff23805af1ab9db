"""What the planner reads each interval, and what it decides."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ScaleAction(str, enum.Enum):
    SCALE_UP = "scale_up"
    SCALE_DOWN = "scale_down"
    HOLD = "hold"


@dataclass(slots=True, frozen=True)
class IntervalObservation:
    """One adjustment interval, as the metrics reader saw it.

    Worker counts include workers still in grace (loaded, not yet carrying a
    representative load). Latency percentiles and the load signals are None
    when nothing measured them.
    """

    num_prefill_workers: int
    num_decode_workers: int
    #: Requests that arrived during the interval.
    num_requests: int
    #: Arrivals per second over the interval.
    request_rate_per_s: float
    mean_input_tokens: float | None = None
    mean_output_tokens: float | None = None
    num_prefill_workers_in_grace: int = 0
    num_decode_workers_in_grace: int = 0
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    #: Means over the interval, where only sums and counts were measured (Triton's metrics give no percentiles).
    ttft_mean_ms: float | None = None
    itl_mean_ms: float | None = None
    #: Prompt tokens waiting for a prefill worker, at the end of the interval.
    prefill_queue_tokens: int | None = None
    #: Prompt tokens being prefilled, at the end of the interval.
    active_prefill_tokens: int | None = None
    #: Mean requests running per decode worker, at the end of the interval.
    decode_running_requests: float | None = None
    #: Mean requests queued per decode worker (waiting for a slot in its batch), at the end of the interval.
    decode_waiting_requests: float | None = None
    #: Mean fraction (0-1) of the decode workers' KV cache in use.
    decode_kv_usage: float | None = None

    def __post_init__(self) -> None:
        for name in ("num_prefill_workers", "num_decode_workers", "num_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.request_rate_per_s < 0:
            raise ValueError(f"request_rate_per_s must be >= 0, got {self.request_rate_per_s}")
        if not 0 <= self.num_prefill_workers_in_grace <= self.num_prefill_workers:
            raise ValueError(
                f"num_prefill_workers_in_grace ({self.num_prefill_workers_in_grace}) must be within "
                f"0..num_prefill_workers ({self.num_prefill_workers})"
            )
        if not 0 <= self.num_decode_workers_in_grace <= self.num_decode_workers:
            raise ValueError(
                f"num_decode_workers_in_grace ({self.num_decode_workers_in_grace}) must be within "
                f"0..num_decode_workers ({self.num_decode_workers})"
            )

    @property
    def prefill_pending_tokens(self) -> int | None:
        """Prompt tokens not yet prefilled (queued plus in flight); None if either is unknown."""
        if self.prefill_queue_tokens is None or self.active_prefill_tokens is None:
            return None
        return self.prefill_queue_tokens + self.active_prefill_tokens


@dataclass(slots=True, frozen=True)
class Decision:
    """Pool sizes wanted after one tick, and why.

    Per-pool reasons: "scale_up", "scale_down", "steady", "hysteresis" (asked
    to shrink, held by the scale-down window or the requests in flight),
    "cooldown", "grace_period",
    "insufficient_data", "budget_clipped"; `is_budget_clipped` says the device
    budget cut what the policy asked for. `detail` carries the numbers.
    """

    at_s: float
    num_prefill_workers: int
    num_decode_workers: int
    prefill_action: ScaleAction
    decode_action: ScaleAction
    prefill_reason: str
    decode_reason: str
    is_budget_clipped: bool = False
    detail: str = ""

    @property
    def reason(self) -> str:
        """One line: `prefill=<reason> decode=<reason>[ budget_clipped]`."""
        text = f"prefill={self.prefill_reason} decode={self.decode_reason}"
        return text + " budget_clipped" if self.is_budget_clipped else text

    @property
    def is_change(self) -> bool:
        return self.prefill_action is not ScaleAction.HOLD or self.decode_action is not ScaleAction.HOLD
