"""The load policy: pool sizes from the load measured now, with no profile. Pure.

A pool whose load per worker is above the high threshold grows to
ceil(load / high) workers (at least one more): what the load needs, no more.
Below the low threshold it asks for ceil(load / low), the fewest that keep
each worker at the bottom of the band: it returns in proportion to the load,
not one worker an interval. Its floor is ceil(load / high).

- prefill load: the interval's mean of the prompt tokens waiting or being
  prefilled, by Little's law (prompt tokens per second times the mean TTFT),
  steadier than the gauges read at one instant, which swing with every long
  prompt; the prompts queued at the tick count on top to grow on, a burst
  that has not reached a first token yet. Without a measured TTFT, or with
  no prefill worker (decode workers then prefill, and the TTFT is theirs),
  the queued and in-flight tokens at the tick;
- decode load: KV usage in worker units; requests queued for a slot in the
  batch ask for as many workers as would run them all at today's batch.
"""

from __future__ import annotations

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.observations import IntervalObservation
from triton_disagg.planner.sizing import PoolAsk, workers_for


def load_prefill_ask(config: PlannerConfig, obs: IntervalObservation) -> PoolAsk:
    pending = obs.prefill_pending_tokens
    if pending is None:
        return PoolAsk(None, "prefill queue/active tokens not reported")
    high, low = config.prefill_tokens_high, config.prefill_tokens_low
    # With no prefill worker, decode workers prefill their own prompts: the TTFT is theirs, and only
    # prompts reported waiting for a prefill worker ask for one.
    is_measured = obs.mean_input_tokens is not None and obs.ttft_mean_ms is not None
    if obs.num_prefill_workers == 0 or obs.request_rate_per_s == 0 or not is_measured:
        return band(obs.num_prefill_workers, float(pending), float(pending), high, low, "prefill tokens")
    mean_tokens = obs.request_rate_per_s * obs.mean_input_tokens * obs.ttft_mean_ms / 1000.0
    return band(obs.num_prefill_workers, mean_tokens + (obs.prefill_queue_tokens or 0), mean_tokens, high, low,
                "prefill tokens")


def load_decode_ask(config: PlannerConfig, obs: IntervalObservation) -> PoolAsk:
    if obs.decode_kv_usage is None:
        return PoolAsk(None, "decode KV usage not reported")
    n = obs.num_decode_workers
    # KV usage is a mean over workers; in worker units the total load is usage * n.
    total = obs.decode_kv_usage * n
    ask = band(n, total, total, config.kv_usage_high, config.kv_usage_low, "KV usage")
    # Requests queued for a slot mean the batches are full before the KV is.
    running, waiting = obs.decode_running_requests or 0.0, obs.decode_waiting_requests or 0.0
    if n == 0 or running < 1 or waiting <= 0:
        return ask
    needed = workers_for(n * (running + waiting) / running)
    if needed <= ask.num_workers:
        return ask
    return PoolAsk(needed, f"{ask.detail}; {waiting:.3g} waiting per worker for a slot", max(ask.floor, needed))


def band(n: int, peak: float, level: float, high: float, low: float, what: str) -> PoolAsk:
    """The load policy's ask for a pool of `n` with load `peak` (to grow on) and `level` (to shrink on).

    Above `high` per worker: ceil(peak / high) workers, at least n + 1: what the load needs, no more.
    Below `low`: ceil(level / low), the fewest that keep each worker at the bottom of the band, so the
    pool returns in proportion to the load. Floor: ceil(level / high), what keeps each under `high`.
    """
    floor = workers_for(level / high)
    if n == 0:
        return PoolAsk(1 if peak > 0 else 0, f"{what} {peak:.3g} on no workers", floor)
    detail = f"{what} {level / n:.3g} per worker, {peak / n:.3g} with the queue (band {low:g}-{high:g})"
    if peak / n > high:
        return PoolAsk(max(n + 1, workers_for(peak / high)), detail, floor)
    if level / n < low:
        return PoolAsk(workers_for(level / low), detail, floor)
    return PoolAsk(n, detail, floor)
