"""Planner settings: defaults are valid, bad settings name the setting and the fix."""

from __future__ import annotations

import pytest

from triton_disagg.planner.config import PlannerConfig, PlannerPolicy, PredictorKind


def test_defaults_are_valid_and_strings_become_enums():
    config = PlannerConfig(policy="load", predictor="moving_average")
    assert config.policy is PlannerPolicy.LOAD
    assert config.predictor is PredictorKind.MOVING_AVERAGE
    assert PlannerConfig().devices_for(2, 3) == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # 2 prefill x 2 devices + 1 decode x 1 device = 5 > 4.
        (dict(device_budget=4, min_prefill_workers=2, devices_per_prefill_worker=2),
         r"device_budget \(4\) is below the minimum pools' 5 devices.*raise device_budget to >= 5"),
        (dict(device_kind="tpu"), r"device_kind 'tpu' is unknown; use one of cpu, a100"),
        (dict(policy="magic"), r"policy 'magic' is unknown; use one of load, slo"),
        (dict(predictor="arima"), r"predictor 'arima' is unknown; use one of constant"),
        (dict(ttft_ms=0), r"ttft_ms must be > 0"),
        (dict(max_decode_workers=0), r"max_decode_workers \(0\) must be >= min_decode_workers"),
        (dict(min_prefill_workers=3, max_prefill_workers=2), r"raise max_prefill_workers"),
        (dict(kv_usage_low=0.9, kv_usage_high=0.8), r"kv_usage_low \(0.9\) and kv_usage_high \(0.8\)"),
        (dict(prefill_tokens_low=5000, prefill_tokens_high=5000), r"prefill_tokens_low \(5000\).*hysteresis"),
        (dict(scale_down_cooldown_s=-1), r"scale_down_cooldown_s must be >= 0"),
        (dict(holt_alpha=0), r"holt_alpha must be in \(0, 1\]"),
        (dict(moving_average_window=0), r"moving_average_window must be >= 1"),
        (dict(quantile_window=0), r"quantile_window must be >= 1"),
        (dict(quantile=0), r"quantile must be in \(0, 1\], got 0; 1 forecasts the window's maximum"),
        (dict(worker_startup_s=-5), r"worker_startup_s must be >= 0"),
        (dict(scale_down_window_s=-1), r"scale_down_window_s must be >= 0"),
        (dict(prefill_spare_workers=-1), r"prefill_spare_workers must be >= 0"),
    ],
)
def test_bad_settings_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message):
        PlannerConfig(**overrides)


def test_the_slo_policy_looks_ahead_by_a_worker_start_up_plus_an_interval():
    """(45 s start-up + 30 s interval) / 30 s = 2.5 intervals."""
    assert PlannerConfig(worker_startup_s=45.0, adjustment_interval_s=30.0).horizon_intervals == 2.5
