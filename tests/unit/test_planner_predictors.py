"""Predictors of the next interval's rate and lengths."""

from __future__ import annotations

import pytest

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.predictors import (
    ConstantPredictor,
    HoltPredictor,
    MovingAveragePredictor,
    QuantilePredictor,
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


def test_holt_peak_over_a_horizon_follows_the_trend_up_but_not_down():
    """alpha = beta = 0.5 after 10, 20: level 15, trend 2.5. Rising, the peak over 3 intervals is the
    last, 15 + 3 x 2.5 = 22.5 (over 1.5 intervals, 18.75). Then 30, 10, 10 turn the trend down (level
    15.234375, trend -1.8359375): the peak is the next interval's, 13.3984375, whatever the horizon."""
    predictor = HoltPredictor(alpha=0.5, beta=0.5)
    for value in (10.0, 20.0):
        predictor.add(value)
    assert predictor.predict(3) == pytest.approx(22.5)
    assert predictor.predict(1.5) == pytest.approx(18.75)
    for value in (30.0, 10.0, 10.0):
        predictor.add(value)
    assert predictor.predict(1) == pytest.approx(13.3984375)
    assert predictor.predict(4) == pytest.approx(13.3984375)


def test_quantile_holds_the_peak_of_its_window():
    """Window 3, maximum: 5, 9, 4 -> 9; after 2 and 3 the 9 has left the window -> 4."""
    predictor = QuantilePredictor(window=3, quantile=1.0)
    assert predictor.predict() is None
    for value in (5.0, 9.0, 4.0):
        predictor.add(value)
    assert predictor.predict(5) == 9.0
    for value in (2.0, 3.0):
        predictor.add(value)
    assert predictor.predict() == 4.0


def test_quantile_interpolates_between_ordered_values():
    """Window 4 over 1, 2, 3, 10: quantile 0.5 sits at position 1.5 between 2 and 3 -> 2.5;
    0.9 at position 2.7 between 3 and 10 -> 3 + 0.7 x 7 = 7.9."""
    values = (1.0, 10.0, 3.0, 2.0)
    for quantile, expected in ((0.5, 2.5), (0.9, 7.9)):
        predictor = QuantilePredictor(window=4, quantile=quantile)
        for value in values:
            predictor.add(value)
        assert predictor.predict() == pytest.approx(expected)


@pytest.mark.parametrize(("window", "quantile", "match"), [(0, 1.0, "window"), (3, 0.0, "quantile"), (3, 1.5, "quantile")])
def test_quantile_rejects_bad_settings(window, quantile, match):
    with pytest.raises(ValueError, match=match):
        QuantilePredictor(window=window, quantile=quantile)


def test_holt_forecast_is_never_negative():
    """10 then 0 with alpha = beta = 1: level 0, trend -10 -> -10, clamped to 0."""
    predictor = HoltPredictor(alpha=1.0, beta=1.0)
    predictor.add(10.0)
    predictor.add(0.0)
    assert predictor.predict() == 0.0


@pytest.mark.parametrize(("kind", "type_"), [("constant", ConstantPredictor),
                                             ("moving_average", MovingAveragePredictor),
                                             ("holt", HoltPredictor),
                                             ("quantile", QuantilePredictor)])
def test_make_predictor_follows_config(kind, type_):
    assert isinstance(make_predictor(PlannerConfig(predictor=kind)), type_)
