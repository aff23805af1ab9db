"""Predictors of the next interval's rate and lengths."""

from __future__ import annotations

import pytest

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.predictors import (
    ConstantPredictor,
    HoltPredictor,
    MovingAveragePredictor,
    make_predictor,
)


def test_constant_repeats_the_last_value():
    predictor = ConstantPredictor()
    assert predictor.predict() is None
    for value in (3.0, 7.0):
        predictor.add(value)
    assert predictor.predict() == 7.0


def test_moving_average_over_the_window():
    """Window 3 after 1, 2, 3, 4: (2 + 3 + 4) / 3 = 3."""
    predictor = MovingAveragePredictor(window=3)
    for value in (1.0, 2.0, 3.0, 4.0):
        predictor.add(value)
    assert predictor.predict() == 3.0


def test_holt_follows_a_trend():
    """alpha = beta = 0.5.
    10: level 10, trend 0 -> 10.
    20: level 0.5 * 20 + 0.5 * (10 + 0) = 15, trend 0.5 * (15 - 10) + 0.5 * 0 = 2.5 -> 17.5.
    30: level 0.5 * 30 + 0.5 * 17.5 = 23.75, trend 0.5 * 8.75 + 0.5 * 2.5 = 5.625 -> 29.375.
    """
    predictor = HoltPredictor(alpha=0.5, beta=0.5)
    expected = {10.0: 10.0, 20.0: 17.5, 30.0: 29.375}
    for value, forecast in expected.items():
        predictor.add(value)
        assert predictor.predict() == pytest.approx(forecast)


def test_holt_forecast_is_never_negative():
    """10 then 0 with alpha = beta = 1: level 0, trend -10 -> -10, clamped to 0."""
    predictor = HoltPredictor(alpha=1.0, beta=1.0)
    predictor.add(10.0)
    predictor.add(0.0)
    assert predictor.predict() == 0.0


@pytest.mark.parametrize(("kind", "type_"), [("constant", ConstantPredictor),
                                             ("moving_average", MovingAveragePredictor),
                                             ("holt", HoltPredictor)])
def test_make_predictor_follows_config(kind, type_):
    assert isinstance(make_predictor(PlannerConfig(predictor=kind)), type_)
