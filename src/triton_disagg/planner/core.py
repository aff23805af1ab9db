"""The planner's decision core: one observation per interval in, pool sizes and reasons out.

Pure: no clocks (the caller passes `now_s`), no I/O. A tick runs in four steps:

1. the policy asks for a size per pool (None when it lacks data);
2. each ask is clipped to the pool's min/max, then both to the device budget,
   which, when short, is split in proportion to the asks;
3. per pool, cooldowns and grace periods may hold the current size;
4. if a held pool leaves less room than planned, the growing pool is cut again.

Policies:

- load: a pool grows when its load per worker is above the high threshold
  (to ceil(total load / high) workers, at least one more) and shrinks by one
  when below the low threshold, if the remaining workers would still be
  below the high one (hysteresis). Prefill load is queued plus in-flight
  prompt tokens; decode load is KV usage.
- slo: the next interval's request rate and mean input/output lengths are
  predicted, then
      prefill = ceil((rate * input_tokens + pending_tokens / interval_s) * (1 + headroom)
                     / throughput(input_tokens, batch))
  with batch the largest whose profiled TTFT meets the target and pending_tokens
  the prompts still waiting or in flight (a backlog to clear within the interval), and
      decode = ceil(rate * output_tokens * itl_s * (1 + headroom) / max_concurrency)
  with max_concurrency the most requests a worker runs within the ITL target
  at context input_tokens + output_tokens / 2 and itl_s the ITL it then runs at
  (Little's law: requests in flight = arrival rate x time in decode).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triton_disagg.planner.config import PlannerConfig, PlannerPolicy
from triton_disagg.planner.observations import Decision, IntervalObservation, ScaleAction
from triton_disagg.planner.predictors import make_predictor
from triton_disagg.planner.profile import PerformanceProfile

#: Keeps float noise (2.0000000001 workers) from costing a whole worker.
_CEIL_SLACK = 1e-9

#: Bound on a latency correction factor: one odd interval (a stall, an idle pool) must not swing
#: the plan by more than this.
MAX_CORRECTION = 4.0


@dataclass(slots=True)
class _PoolState:
    last_change_at_s: float | None = None
    grace_until_s: float = -math.inf
    #: (last_change_at_s, grace_until_s) before the last decision changed them, until `applied` confirms it.
    saved: tuple[float | None, float] | None = None


@dataclass(slots=True, frozen=True)
class _Ask:
    """A policy's size for one pool; None when it lacks the data to say."""

    num_workers: int | None
    detail: str


class Planner:
    """Sizes the prefill and decode pools each interval. Not thread-safe; one caller ticks it."""

    def __init__(self, config: PlannerConfig, profile: PerformanceProfile | None = None) -> None:
        """Raises ValueError when the SLO policy has no profile or the profile does not fit the config."""
        if config.policy is PlannerPolicy.SLO:
            if profile is None:
                raise ValueError(
                    "policy 'slo' needs profile data; run `triton-disagg profile` and pass its file, "
                    "or use policy 'load'"
                )
            if profile.device_kind != config.device_kind:
                raise ValueError(
                    f"profile was taken on device_kind {profile.device_kind!r} but device_kind is "
                    f"{config.device_kind!r}; profile this device or set device_kind={profile.device_kind!r}"
                )
            for pool in ("prefill", "decode"):
                devices = getattr(config, f"devices_per_{pool}_worker")
                if devices != profile.devices_per_worker:
                    raise ValueError(
                        f"devices_per_{pool}_worker is {devices} but the profile is of "
                        f"{profile.devices_per_worker}-device workers; set devices_per_{pool}_worker="
                        f"{profile.devices_per_worker} or profile {devices}-device workers"
                    )
        self.config = config
        self.profile = profile
        self._rate = make_predictor(config)
        self._input_tokens = make_predictor(config)
        self._output_tokens = make_predictor(config)
        self._prefill = _PoolState()
        self._decode = _PoolState()
        self._last_tick_s: float | None = None
        #: Pool sizes when the last decision was taken, until `applied` reports what it reached.
        self._sizes_before: tuple[int, int] | None = None

    def tick(self, observation: IntervalObservation, now_s: float) -> Decision:
        """Decide the pool sizes after the interval `observation` covers; mutates the planner's memory.

        Ticks must come in time order (ValueError otherwise).
        """
        if self._last_tick_s is not None and now_s < self._last_tick_s:
            raise ValueError(f"tick at {now_s} s is before the previous tick at {self._last_tick_s} s")
        self._last_tick_s = now_s
        config, obs = self.config, observation
        if config.policy is PlannerPolicy.LOAD:
            prefill_ask, decode_ask = self._load_prefill(obs), self._load_decode(obs)
        else:
            prefill_ask, decode_ask = self._slo_asks(obs)

        want_p = _clip(prefill_ask.num_workers, config.min_prefill_workers, config.max_prefill_workers)
        want_d = _clip(decode_ask.num_workers, config.min_decode_workers, config.max_decode_workers)
        want_p, want_d, is_clipped = self._fit_budget(want_p, want_d, obs)

        now_p, now_d = obs.num_prefill_workers, obs.num_decode_workers
        in_grace_p = obs.num_prefill_workers_in_grace > 0 or now_s < self._prefill.grace_until_s
        in_grace_d = obs.num_decode_workers_in_grace > 0 or now_s < self._decode.grace_until_s
        next_p, reason_p = self._gate(self._prefill, now_p, want_p, in_grace_p, now_s)
        next_d, reason_d = self._gate(self._decode, now_d, want_d, in_grace_d, now_s)

        # A held pool may keep more devices than step 2 left it: cut the growing pool to what remains.
        if config.devices_for(next_p, next_d) > config.device_budget:
            if next_p > now_p:
                room = (config.device_budget - config.devices_for(0, next_d)) // config.devices_per_prefill_worker
                next_p = max(now_p, room)
                reason_p = reason_p if next_p > now_p else "budget_clipped"
            if next_d > now_d:
                room = (config.device_budget - config.devices_for(next_p, 0)) // config.devices_per_decode_worker
                next_d = max(now_d, room)
                reason_d = reason_d if next_d > now_d else "budget_clipped"
            is_clipped = True

        self._sizes_before = (now_p, now_d)
        action_p = self._commit(self._prefill, now_p, next_p, now_s)
        action_d = self._commit(self._decode, now_d, next_d, now_s)
        return Decision(
            at_s=now_s,
            num_prefill_workers=next_p,
            num_decode_workers=next_d,
            prefill_action=action_p,
            decode_action=action_d,
            prefill_reason=reason_p,
            decode_reason=reason_d,
            is_budget_clipped=is_clipped,
            detail=f"prefill: {prefill_ask.detail}; decode: {decode_ask.detail}",
        )

    # -- policies ---------------------------------------------------------------------------

    def _load_prefill(self, obs: IntervalObservation) -> _Ask:
        pending = obs.prefill_pending_tokens
        if pending is None:
            return _Ask(None, "prefill queue/active tokens not reported")
        high, low = self.config.prefill_tokens_high, self.config.prefill_tokens_low
        return _hysteresis(obs.num_prefill_workers, float(pending), high, low, "prefill tokens")

    def _load_decode(self, obs: IntervalObservation) -> _Ask:
        if obs.decode_kv_usage is None:
            return _Ask(None, "decode KV usage not reported")
        n = obs.num_decode_workers
        # KV usage is a mean over workers; in worker units the total load is usage * n.
        total = obs.decode_kv_usage * n
        return _hysteresis(n, total, self.config.kv_usage_high, self.config.kv_usage_low, "KV usage")

    def _slo_asks(self, obs: IntervalObservation) -> tuple[_Ask, _Ask]:
        config, profile = self.config, self.profile
        assert profile is not None  # checked in __init__
        self._rate.add(obs.request_rate_per_s)
        has_lengths = obs.mean_input_tokens is not None and obs.mean_output_tokens is not None
        if has_lengths and obs.num_requests >= config.min_requests_per_interval:
            self._input_tokens.add(obs.mean_input_tokens)
            self._output_tokens.add(obs.mean_output_tokens)
        rate = self._rate.predict()
        input_tokens = self._input_tokens.predict()
        output_tokens = self._output_tokens.predict()
        if rate is None or input_tokens is None or output_tokens is None:
            detail = f"no interval yet with >= {config.min_requests_per_interval} requests to learn lengths from"
            return _Ask(None, detail), _Ask(None, detail)
        headroom = 1.0 + config.capacity_headroom

        batch = profile.prefill.max_batch_within(input_tokens, config.ttft_ms)
        prefill_note = ""
        if batch is None:
            batch, prefill_note = 1, f" (TTFT {config.ttft_ms:g} ms unreachable at {input_tokens:.0f} tokens)"
        throughput = profile.prefill.throughput_tokens_per_s(input_tokens, batch)
        # Prompts already waiting must be prefilled within the next interval too.
        backlog_tokens_per_s = (obs.prefill_pending_tokens or 0) / config.adjustment_interval_s
        # Only a TTFT better than profiled counts (prefix-cache hits save prefill work); a worse one
        # is queueing, which the backlog term and the load it reflects already answer.
        ttft_factor = min(1.0, self._correction(obs, obs.ttft_mean_ms, profile.prefill.ttft_at_ms(input_tokens, 1)))
        need_p = (rate * input_tokens + backlog_tokens_per_s) * headroom * ttft_factor / throughput
        prefill = _Ask(
            math.ceil(need_p - _CEIL_SLACK),
            f"({rate:.3g} req/s x {input_tokens:.0f} tok + {backlog_tokens_per_s:.0f} tok/s backlog) x {headroom:g} "
            f"{'' if ttft_factor == 1 else f'x {ttft_factor:.2f} TTFT correction '}"
            f"/ {throughput:.0f} tok/s (batch {batch}) = {need_p:.2f} workers{prefill_note}",
        )

        context_tokens = input_tokens + output_tokens / 2
        # Without the running batch there is nothing to compare the measured ITL with: no correction.
        running = obs.decode_running_requests
        itl_factor = 1.0
        if running is not None and running >= 1:
            itl_factor = self._correction(obs, obs.itl_mean_ms, profile.decode.itl_at_ms(running, context_tokens))
        itl_target_ms = config.itl_ms / itl_factor  # read the profile where it meets the target in practice
        max_concurrency = profile.decode.max_concurrency_within(context_tokens, itl_target_ms)
        decode_note = "" if itl_factor == 1 else f" (ITL correction {itl_factor:.2f}: profile read at {itl_target_ms:.3g} ms)"
        if max_concurrency is None:
            max_concurrency = 1
            decode_note += f" (ITL {config.itl_ms:g} ms unreachable at {context_tokens:.0f} tokens)"
        # Little's law with the ITL serving really gives at that concurrency: the profiled one times the
        # correction. (Dynamo's planner moves only the target; then a worker's throughput is overstated
        # by the same factor and the pool comes out short.)
        itl_s = profile.decode.itl_at_ms(max_concurrency, context_tokens) * itl_factor / 1000.0
        concurrency = rate * output_tokens * itl_s * headroom
        need_d = concurrency / max_concurrency
        decode = _Ask(
            math.ceil(need_d - _CEIL_SLACK),
            f"{rate:.3g} req/s x {output_tokens:.0f} tok x {itl_s * 1000:.3g} ms x {headroom:g} = "
            f"{concurrency:.1f} in flight / {max_concurrency} per worker = {need_d:.2f} workers{decode_note}",
        )
        return prefill, decode

    def _correction(self, obs: IntervalObservation, observed_ms: float | None, profiled_ms: float) -> float:
        """observed / profiled latency, clipped to [1 / MAX_CORRECTION, MAX_CORRECTION]; 1 when off, unmeasured,
        or measured on fewer requests than an interval needs to be trusted."""
        if not self.config.latency_correction or observed_ms is None or observed_ms <= 0 or profiled_ms <= 0:
            return 1.0
        if obs.num_requests < self.config.min_requests_per_interval:
            return 1.0
        return min(MAX_CORRECTION, max(1.0 / MAX_CORRECTION, observed_ms / profiled_ms))

    # -- constraints ------------------------------------------------------------------------

    def _fit_budget(self, want_p: int | None, want_d: int | None, obs: IntervalObservation) -> tuple[int | None, int | None, bool]:
        """Cut the asks to the device budget, in proportion to them; a missing ask stands at its current size."""
        config = self.config
        p = obs.num_prefill_workers if want_p is None else want_p
        d = obs.num_decode_workers if want_d is None else want_d
        budget = config.device_budget
        needed = config.devices_for(p, d)
        if needed <= budget:
            return want_p, want_d, False
        if want_p is None:
            room = (budget - config.devices_for(p, 0)) // config.devices_per_decode_worker
            return None, max(config.min_decode_workers, min(d, room)), True
        if want_d is None:
            room = (budget - config.devices_for(0, d)) // config.devices_per_prefill_worker
            return max(config.min_prefill_workers, min(p, room)), None, True
        fit_p = max(config.min_prefill_workers, math.floor(p * budget / needed))
        fit_d = max(config.min_decode_workers, math.floor(d * budget / needed))
        # A minimum may have lifted one pool past its share: take it back from the other.
        while config.devices_for(fit_p, fit_d) > budget:
            if fit_d > config.min_decode_workers and (fit_d / d >= fit_p / p or fit_p <= config.min_prefill_workers):
                fit_d -= 1
            else:
                fit_p -= 1
        # Rounding down leaves devices over: give them to the pool furthest below its ask.
        while True:
            grow_p = fit_p < p and config.devices_for(fit_p + 1, fit_d) <= budget
            grow_d = fit_d < d and config.devices_for(fit_p, fit_d + 1) <= budget
            if not (grow_p or grow_d):
                break
            if grow_p and (not grow_d or fit_p / p <= fit_d / d):
                fit_p += 1
            else:
                fit_d += 1
        return fit_p, fit_d, True

    def _gate(self, pool: _PoolState, now: int, want: int | None, in_grace: bool, now_s: float) -> tuple[int, str]:
        config = self.config
        if want is None:
            return now, "insufficient_data"
        if want == now:
            return now, "steady"
        since_change_s = math.inf if pool.last_change_at_s is None else now_s - pool.last_change_at_s
        if want < now:
            if in_grace:
                return now, "grace_period"
            if since_change_s < config.scale_down_cooldown_s:
                return now, "cooldown"
            return want, "scale_down"
        if in_grace and config.policy is PlannerPolicy.LOAD:
            return now, "grace_period"
        if since_change_s < config.scale_up_cooldown_s:
            return now, "cooldown"
        return want, "scale_up"

    def applied(self, num_prefill_workers: int, num_decode_workers: int) -> None:
        """Report the pool sizes the last decision's changes reached. A pool that did not change at all
        (the change was refused or failed) gets the cooldown and grace it had before that decision, so
        the next tick judges it as the pool it really is."""
        if self._sizes_before is None:
            return
        for pool, before, after in (
            (self._prefill, self._sizes_before[0], num_prefill_workers),
            (self._decode, self._sizes_before[1], num_decode_workers),
        ):
            if after == before and pool.saved is not None:
                pool.last_change_at_s, pool.grace_until_s = pool.saved
            pool.saved = None
        self._sizes_before = None

    def _commit(self, pool: _PoolState, now: int, new: int, now_s: float) -> ScaleAction:
        pool.saved = None
        if new == now:
            return ScaleAction.HOLD
        pool.saved = (pool.last_change_at_s, pool.grace_until_s)
        pool.last_change_at_s = now_s
        if new > now:
            pool.grace_until_s = now_s + self.config.grace_period_s
            return ScaleAction.SCALE_UP
        return ScaleAction.SCALE_DOWN


def _clip(num_workers: int | None, low: int, high: int) -> int | None:
    return None if num_workers is None else min(high, max(low, num_workers))


def _hysteresis(n: int, total: float, high: float, low: float, what: str) -> _Ask:
    """Grow above `high` per worker, shrink by one below `low` if n - 1 workers stay below `high`."""
    if n == 0:
        return _Ask(1 if total > 0 else 0, f"{what} {total:.3g} on no workers")
    per_worker = total / n
    detail = f"{what} {per_worker:.3g} per worker (band {low:g}-{high:g})"
    if per_worker > high:
        return _Ask(max(n + 1, math.ceil(total / high - _CEIL_SLACK)), detail)
    if per_worker < low:
        after = math.inf if n == 1 and total > 0 else (0.0 if n == 1 else total / (n - 1))
        if after < high:
            return _Ask(n - 1, detail)
    return _Ask(n, detail)
