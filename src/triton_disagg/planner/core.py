"""The planner's decision core: one observation per interval in, pool sizes and reasons out.

Pure: no clocks (the caller passes `now_s`), no I/O. A tick runs in five steps:

1. the policy asks for a size per pool (None when it lacks data), and says
   the fewest workers the requests in flight need (its floor);
2. a pool asked to shrink shrinks only to the largest size asked within
   `scale_down_window_s`, and never below its floor: a dip of an interval or
   two costs no worker, a lasting fall returns the pool in one step;
3. each ask is clipped to the pool's min/max, then both to the device
   budget. When the budget is short and one pool grows, the other, if its
   own ask is smaller, yields its devices at once (its window and cooldown
   do not hold it); what is still short is split in proportion to the asks;
4. per pool, cooldowns and grace periods may hold the current size;
5. if a held pool leaves less room than planned, the growing pool is cut again.

Policies:

- load: no profile. A pool whose load per worker is above the high
  threshold grows to ceil(load / high) workers (at least one more): what
  the load needs, no more. Below the low threshold it asks for
  ceil(load / low), the fewest that keep each worker at the bottom of the
  band: it returns in proportion to the load. Prefill load is the interval's
  mean of the prompt tokens waiting or being prefilled (Little's law: prompt
  tokens per second times mean TTFT), plus the prompts queued at the tick to
  grow on; decode load is KV usage, and requests queued for a decode slot
  ask for the workers that would run them. Neither pool grows while one of
  its workers is in grace: its metrics do not show the new capacity yet.
- slo: the coming intervals' request rate and mean prompt and output lengths
  are predicted, and each pool sized for the largest load predicted before a
  worker loaded now would serve (`worker_startup_s` plus one interval); the
  arithmetic is in planner/sizing.py. Floors: the prompts queued and being
  prefilled need the workers that prefill them within the TTFT target, the
  requests decoding or queued for a slot those that run them within the ITL
  target. The profile is corrected by what serving measures
  (`latency_correction`; Dynamo's SLA planner is the model): the mean ITL
  against the profile's ITL at the running batch and context; for prefill,
  the throughput of a pool that was saturated all interval against the
  profile's, and else only a TTFT better than a lone prompt's profiled one
  (partly cached prompts; a worse TTFT may be queueing, which the backlog
  term answers). Corrections are smoothed over intervals and kept through
  intervals that measure nothing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from triton_disagg.planner.config import PlannerConfig, PlannerPolicy
from triton_disagg.planner.observations import Decision, IntervalObservation, ScaleAction
from triton_disagg.planner.predictors import make_predictor
from triton_disagg.planner.profile import PerformanceProfile
from triton_disagg.planner.load_policy import load_decode_ask, load_prefill_ask
from triton_disagg.planner.sizing import (
    LoadForecast,
    PoolAsk,
    decode_need,
    decode_rate,
    prefill_need,
    prefill_rate,
    workers_for,
)

#: Bound on a latency correction factor: one odd interval (a stall, an idle pool) must not swing
#: the plan by more than this.
MAX_CORRECTION = 4.0
#: Weight of the newest interval in a correction factor (exponential smoothing).
CORRECTION_SMOOTHING = 0.5
#: A prefill pool whose prompts waited at both ends of an interval, with a mean TTFT over this many
#: times a lone prompt's, counts as busy all along: its throughput is measured from what it got through.
SATURATED_TTFT_RATIO = 3.0


@dataclass(slots=True)
class _PoolState:
    last_change_at_s: float | None = None
    grace_until_s: float = -math.inf
    #: (last_change_at_s, grace_until_s) before the last decision changed them, until `applied` confirms it.
    saved: tuple[float | None, float] | None = None
    #: (at_s, workers asked) of the ticks within the scale-down window.
    asks: deque[tuple[float, int]] = field(default_factory=deque)


@dataclass(slots=True)
class _Correction:
    """observed / profiled latency, smoothed over intervals; 1 until something was measured."""

    factor: float = 1.0
    is_measured: bool = False

    def update(self, ratio: float) -> None:
        ratio = min(MAX_CORRECTION, max(1.0 / MAX_CORRECTION, ratio))
        self.factor = ratio if not self.is_measured else (1 - CORRECTION_SMOOTHING) * self.factor + CORRECTION_SMOOTHING * ratio
        self.is_measured = True


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
        #: Prefill work per prompt token against the profile's: < 1 when prompts are partly cached, > 1
        #: when workers prefill slower than profiled.
        self._prefill_work = _Correction()
        #: The prompt tokens queued at the previous tick and the prefill pool then (None: unknown).
        self._previous_queue: tuple[int, int] | None = None
        self._itl = _Correction()
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
            prefill_ask, decode_ask = load_prefill_ask(config, obs), load_decode_ask(config, obs)
        else:
            prefill_ask, decode_ask = self._slo_asks(obs)
        now_p, now_d = obs.num_prefill_workers, obs.num_decode_workers

        held_p = self._hold_down(self._prefill, prefill_ask, now_p, now_s)
        held_d = self._hold_down(self._decode, decode_ask, now_d, now_s)
        want_p = _clip(held_p, config.min_prefill_workers, config.max_prefill_workers)
        want_d = _clip(held_d, config.min_decode_workers, config.max_decode_workers)
        # One budget, two pools: when it is short, a pool asked to shrink yields its devices to a
        # growing pool at once, without waiting out its scale-down window or cooldown.
        yields_p = yields_d = False
        if config.devices_for(now_p if want_p is None else want_p, now_d if want_d is None else want_d) > config.device_budget:
            yields_p = want_d is not None and want_d > now_d and _shrinks(prefill_ask, now_p)
            yields_d = want_p is not None and want_p > now_p and _shrinks(decode_ask, now_d)
            if yields_p:
                want_p = _clip(max(prefill_ask.num_workers, prefill_ask.floor), config.min_prefill_workers, config.max_prefill_workers)
            if yields_d:
                want_d = _clip(max(decode_ask.num_workers, decode_ask.floor), config.min_decode_workers, config.max_decode_workers)
        want_p, want_d, is_clipped = self._fit_budget(want_p, want_d, obs)

        in_grace_p = obs.num_prefill_workers_in_grace > 0 or now_s < self._prefill.grace_until_s
        in_grace_d = obs.num_decode_workers_in_grace > 0 or now_s < self._decode.grace_until_s
        next_p, reason_p = self._gate(self._prefill, now_p, want_p, in_grace_p, now_s, yields_p)
        next_d, reason_d = self._gate(self._decode, now_d, want_d, in_grace_d, now_s, yields_d)
        if reason_p == "steady" and prefill_ask.num_workers is not None and prefill_ask.num_workers < now_p:
            reason_p = "hysteresis"
        if reason_d == "steady" and decode_ask.num_workers is not None and decode_ask.num_workers < now_d:
            reason_d = "hysteresis"

        # A held pool may keep more devices than step 3 left it: cut the growing pool to what remains.
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

    def _hold_down(self, pool: _PoolState, ask: PoolAsk, now: int, now_s: float) -> int | None:
        """The ask, or when it is below `now`, the largest ask of the scale-down window and the floor (<= now)."""
        if ask.num_workers is None:
            return None
        pool.asks.append((now_s, ask.num_workers))
        while pool.asks[0][0] < now_s - self.config.scale_down_window_s:
            pool.asks.popleft()
        if ask.num_workers >= now:
            return ask.num_workers
        return min(now, max(ask.floor, max(n for _, n in pool.asks)))

    # -- policies ---------------------------------------------------------------------------

    def _learn(self, obs: IntervalObservation) -> None:
        """Feed the interval to the predictors and the corrections."""
        config, profile = self.config, self.profile
        self._rate.add(obs.request_rate_per_s)
        previous_queue, self._previous_queue = self._previous_queue, None
        if obs.prefill_queue_tokens is not None and obs.num_prefill_workers_in_grace == 0:
            self._previous_queue = (obs.prefill_queue_tokens, obs.num_prefill_workers)
        if obs.num_requests < config.min_requests_per_interval:
            return
        if obs.mean_input_tokens is not None:
            self._input_tokens.add(obs.mean_input_tokens)
        if obs.mean_output_tokens is not None:
            self._output_tokens.add(obs.mean_output_tokens)
        if not config.latency_correction or obs.mean_input_tokens is None:
            return
        input_tokens = obs.mean_input_tokens
        # Prefill: when prompts waited at both ends of the interval and waited long (a mean TTFT over
        # SATURATED_TTFT_RATIO times a lone prompt's), the pool prefilled all along, and what it got
        # through is its throughput: this corrects a profile in either direction. Otherwise only a TTFT
        # better than profiled tells (prompts partly cached), since a worse one may be queueing.
        n = obs.num_prefill_workers
        lone_ttft_ms = profile.prefill.ttft_at_ms(input_tokens, 1)
        is_saturated = (
            previous_queue is not None and previous_queue[1] == n > 0 and obs.num_prefill_workers_in_grace == 0
            and previous_queue[0] > 0 and (obs.prefill_queue_tokens or 0) > 0
            and (obs.ttft_mean_ms or 0) > SATURATED_TTFT_RATIO * lone_ttft_ms
        )
        if is_saturated:
            drained_per_s = (previous_queue[0] - obs.prefill_queue_tokens) / config.adjustment_interval_s
            prefilled_per_s = obs.request_rate_per_s * input_tokens + drained_per_s
            if prefilled_per_s > 0:
                self._prefill_work.update(prefill_rate(profile, config, input_tokens).tokens_per_s * n / prefilled_per_s)
        elif obs.ttft_mean_ms is not None and obs.ttft_mean_ms > 0:
            ratio = obs.ttft_mean_ms / lone_ttft_ms
            if ratio < 1 or self._prefill_work.factor < 1:
                self._prefill_work.update(min(1.0, ratio))
        running, output_tokens = obs.decode_running_requests, self._output_tokens.predict()
        # Without the running batch there is nothing to compare the measured ITL with.
        if obs.itl_mean_ms is not None and obs.itl_mean_ms > 0 and running is not None and running >= 1 and output_tokens is not None:
            self._itl.update(obs.itl_mean_ms / profile.decode.itl_at_ms(running, input_tokens + output_tokens / 2))

    def _slo_asks(self, obs: IntervalObservation) -> tuple[PoolAsk, PoolAsk]:
        config, profile = self.config, self.profile
        assert profile is not None  # checked in __init__
        self._learn(obs)
        horizon = config.horizon_intervals
        rate, input_tokens, output_tokens = (p.predict(horizon) for p in (self._rate, self._input_tokens, self._output_tokens))
        if rate is None or input_tokens is None or output_tokens is None:
            detail = f"no interval yet with >= {config.min_requests_per_interval} requests to learn lengths from"
            return PoolAsk(None, detail), PoolAsk(None, detail)
        # A falling trend may forecast a length of 0; a request has at least one token each way.
        input_tokens, output_tokens = max(1.0, input_tokens), max(1.0, output_tokens)
        load = LoadForecast(rate * input_tokens, rate * output_tokens, input_tokens, output_tokens)
        prefill_factor = self._prefill_work.factor
        # Prompts waiting are a backlog to clear on top of the arrivals; those being prefilled are not
        # (the arrival rate already counts them).
        need_p = prefill_need(profile, config, load, obs.prefill_queue_tokens or 0, prefill_factor, config.prefill_spare_workers)
        # The prompts waiting or in flight need enough workers to be prefilled within the TTFT target.
        throughput = prefill_rate(profile, config, load.input_tokens).tokens_per_s / prefill_factor
        floor_p = workers_for((obs.prefill_pending_tokens or 0) / (throughput * config.ttft_ms / 1000.0))
        need_d = decode_need(profile, config, load, self._itl.factor)
        # The requests decoding need as many workers as run them within the ITL target.
        floor_d = 0
        if obs.decode_running_requests is not None:
            max_concurrency = decode_rate(profile, config, load.context_tokens, self._itl.factor).max_concurrency
            in_flight = (obs.decode_running_requests + (obs.decode_waiting_requests or 0.0)) * obs.num_decode_workers
            floor_d = workers_for(in_flight / max_concurrency)
        return (
            PoolAsk(workers_for(need_p.num_workers), need_p.detail, floor_p),
            PoolAsk(workers_for(need_d.num_workers), need_d.detail, floor_d),
        )

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

    def _gate(
        self, pool: _PoolState, now: int, want: int | None, in_grace: bool, now_s: float, is_yielding: bool = False
    ) -> tuple[int, str]:
        config = self.config
        if want is None:
            return now, "insufficient_data"
        if want == now:
            return now, "steady"
        since_change_s = math.inf if pool.last_change_at_s is None else now_s - pool.last_change_at_s
        if want < now:
            if in_grace:
                return now, "grace_period"
            if since_change_s < config.scale_down_cooldown_s and not is_yielding:
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



def _shrinks(ask: PoolAsk, now: int) -> bool:
    """Whether the policy, floor included, asks for fewer than `now` workers."""
    return ask.num_workers is not None and max(ask.num_workers, ask.floor) < now


def _clip(num_workers: int | None, low: int, high: int) -> int | None:
    return None if num_workers is None else min(high, max(low, num_workers))
