"""Factories of the planner's unit tests: a profile whose numbers can be worked out by hand.

- prefill TTFT of a batch of b prompts of L tokens: L * (b + 1) / 20 ms
  (grid: L in {1000, 21000}, b in {1, 4}), so a worker prefills
  b * L / (L * (b + 1) / 20 ms) = 20000 * b / (b + 1) tokens/s:
  10000 at b=1, 13333.3 at b=2, 15000 at b=3, 16000 at b=4;
- decode ITL at context 11000 tokens: 13 + 2 * c ms for c concurrent requests
  (grid: c in {1, 32}, context in {1000, 21000}; rows 10/20 ms and 46/108 ms,
  so the context midpoint gives 15 ms at c=1 and 77 ms at c=32).

`make_config` turns off what a test of the arithmetic does not want: headroom,
cooldowns, grace, the scale-down window and the spare prefill worker.
"""

from __future__ import annotations

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.core import Planner
from triton_disagg.planner.observations import IntervalObservation
from triton_disagg.planner.profile import DecodeProfile, PerformanceProfile, PrefillProfile


def make_profile(**overrides) -> PerformanceProfile:
    fields = dict(
        model="test-model",
        device_kind="cpu",
        devices_per_worker=1,
        prefill=PrefillProfile(
            input_tokens=(1000.0, 21000.0),
            batch_sizes=(1.0, 4.0),
            ttft_ms=((100.0, 250.0), (2100.0, 5250.0)),
        ),
        decode=DecodeProfile(
            concurrency=(1.0, 32.0),
            context_tokens=(1000.0, 21000.0),
            itl_ms=((10.0, 20.0), (46.0, 108.0)),
        ),
    )
    fields.update(overrides)
    return PerformanceProfile(**fields)


def make_config(**overrides) -> PlannerConfig:
    fields = dict(
        ttft_ms=2000.0,
        itl_ms=50.0,
        capacity_headroom=0.0,
        predictor="constant",
        min_requests_per_interval=5,
        scale_up_cooldown_s=0.0,
        scale_down_cooldown_s=0.0,
        scale_down_window_s=0.0,
        grace_period_s=0.0,
        prefill_spare_workers=0,
    )
    fields.update(overrides)
    return PlannerConfig(**fields)


def make_observation(**overrides) -> IntervalObservation:
    """4 req/s of 10900 input and 200 output tokens, on 1 prefill and 1 decode worker."""
    fields = dict(
        num_prefill_workers=1,
        num_decode_workers=1,
        num_requests=120,
        request_rate_per_s=4.0,
        mean_input_tokens=10900.0,
        mean_output_tokens=200.0,
        prefill_queue_tokens=0,
        active_prefill_tokens=0,
        decode_kv_usage=0.5,
    )
    fields.update(overrides)
    return IntervalObservation(**fields)


def make_planner(profile: PerformanceProfile | None = None, **config_overrides) -> Planner:
    return Planner(make_config(**config_overrides), profile or make_profile())


