"""The SLO policy's arithmetic: workers a pool needs for a load, read off the profile. Pure.

    bare = (prefill_tokens_per_s + backlog_tokens / interval_s) * prefill_factor / throughput(input_tokens, batch)
    prefill = max(bare * (1 + headroom), bare + spare_workers)

with batch the largest whose profiled TTFT meets the target, the backlog the
prompt tokens waiting, to be cleared within an interval, and spare_workers
the planner's `prefill_spare_workers` (0 for a static split);

    decode = decode_tokens_per_s * itl_s * (1 + headroom) / max_concurrency

with max_concurrency the most requests a worker runs within the ITL target
(read at target / itl_factor) at context input_tokens + output_tokens / 2,
and itl_s the ITL it then runs at, times itl_factor: by Little's law, the
requests in flight are the output tokens asked per second times the time
each token takes. `prefill_factor` (prefill work per prompt token) and
`itl_factor` are the planner's corrections of the profile by what serving
measured (1: none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.profile import PerformanceProfile

#: Keeps float noise (2.0000000001 workers) from costing a whole worker.
CEIL_SLACK = 1e-9


def workers_for(need: float) -> int:
    """Whole workers for a need of `need` (a fraction), rounded up."""
    return math.ceil(need - CEIL_SLACK)


@dataclass(slots=True, frozen=True)
class PoolAsk:
    """A policy's size for one pool (None when it lacks the data to say), the fewest workers its
    requests in flight need (the pool never shrinks below), and the arithmetic, as text."""

    num_workers: int | None
    detail: str
    floor: int = 0


@dataclass(slots=True, frozen=True)
class LoadForecast:
    """The load a plan is sized for."""

    #: Prompt tokens arriving per second.
    prefill_tokens_per_s: float
    #: Output tokens asked for per second (arrivals times their mean output length).
    decode_tokens_per_s: float
    #: Mean prompt length, tokens.
    input_tokens: float
    #: Mean output length, tokens.
    output_tokens: float

    @property
    def context_tokens(self) -> float:
        """Mean context of a request while it decodes."""
        return self.input_tokens + self.output_tokens / 2


@dataclass(slots=True, frozen=True)
class PoolNeed:
    """Workers one pool needs (a fraction; the caller rounds up) and the arithmetic, as text."""

    num_workers: float
    detail: str


@dataclass(slots=True, frozen=True)
class PrefillRate:
    """What one prefill worker does within the TTFT target."""

    batch: int
    tokens_per_s: float
    #: Empty, or why the target cannot be met.
    note: str = ""


@dataclass(slots=True, frozen=True)
class DecodeRate:
    """What one decode worker does within the (corrected) ITL target."""

    max_concurrency: int
    #: The ITL it runs at with max_concurrency requests, corrected.
    itl_ms: float
    note: str = ""


def prefill_rate(profile: PerformanceProfile, config: PlannerConfig, input_tokens: float) -> PrefillRate:
    batch = profile.prefill.max_batch_within(input_tokens, config.ttft_ms)
    note = ""
    if batch is None:
        batch, note = 1, f" (TTFT {config.ttft_ms:g} ms unreachable at {input_tokens:.0f} tokens)"
    return PrefillRate(batch, profile.prefill.throughput_tokens_per_s(input_tokens, batch), note)


def decode_rate(profile: PerformanceProfile, config: PlannerConfig, context_tokens: float, itl_factor: float = 1.0) -> DecodeRate:
    # Read the profile where it meets the target in practice, then run at the ITL serving really gives
    # there. (Dynamo's planner moves only the target; a worker's throughput is then overstated by the
    # same factor and the pool comes out short.)
    itl_target_ms = config.itl_ms / itl_factor
    max_concurrency = profile.decode.max_concurrency_within(context_tokens, itl_target_ms)
    note = "" if itl_factor == 1 else f" (ITL correction {itl_factor:.2f}: profile read at {itl_target_ms:.3g} ms)"
    if max_concurrency is None:
        max_concurrency = 1
        note += f" (ITL {config.itl_ms:g} ms unreachable at {context_tokens:.0f} tokens)"
    itl_ms = profile.decode.itl_at_ms(max_concurrency, context_tokens) * itl_factor
    return DecodeRate(max_concurrency, itl_ms, note)


def prefill_need(
    profile: PerformanceProfile,
    config: PlannerConfig,
    load: LoadForecast,
    backlog_tokens: float = 0.0,
    prefill_factor: float = 1.0,
    spare_workers: int = 0,
) -> PoolNeed:
    """Prefill workers for `load` plus a backlog to clear within one interval (module docstring); 0 without load."""
    rate = prefill_rate(profile, config, load.input_tokens)
    headroom = 1.0 + config.capacity_headroom
    backlog_tokens_per_s = backlog_tokens / config.adjustment_interval_s
    bare = (load.prefill_tokens_per_s + backlog_tokens_per_s) * prefill_factor / rate.tokens_per_s
    need = max(bare * headroom, bare + spare_workers) if bare > 0 else 0.0
    correction = "" if prefill_factor == 1 else f" x {prefill_factor:.2f} prefill correction"
    spare = f" (+{spare_workers} spare)" if need > bare * headroom else f" x {headroom:g}"
    return PoolNeed(
        need,
        f"({load.prefill_tokens_per_s:.0f} tok/s at {load.input_tokens:.0f} tok + {backlog_tokens_per_s:.0f} tok/s "
        f"backlog){correction} / {rate.tokens_per_s:.0f} tok/s (batch {rate.batch}) = {bare:.2f}{spare} = {need:.2f} "
        f"workers{rate.note}",
    )


def decode_need(profile: PerformanceProfile, config: PlannerConfig, load: LoadForecast, itl_factor: float = 1.0) -> PoolNeed:
    """Decode workers for `load` (module docstring)."""
    rate = decode_rate(profile, config, load.context_tokens, itl_factor)
    headroom = 1.0 + config.capacity_headroom
    concurrency = load.decode_tokens_per_s * rate.itl_ms / 1000.0 * headroom
    need = concurrency / rate.max_concurrency
    return PoolNeed(
        need,
        f"{load.decode_tokens_per_s:.0f} tok/s x {rate.itl_ms:.3g} ms x {headroom:g} = {concurrency:.1f} in flight "
        f"/ {rate.max_concurrency} per worker = {need:.2f} workers{rate.note}",
    )
