"""Predictors of the coming intervals' request rate and mean lengths from past intervals.

A planner sizes its pools for the largest load it expects before a worker it
loads now could serve: `predict(num_intervals)` is that peak over the next
`num_intervals` intervals.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from triton_disagg.planner.config import PlannerConfig, PredictorKind


class Predictor(Protocol):
    """Series in, forecast out. `add` mutates; `predict` does not."""

    def add(self, value: float) -> None: ...

    def predict(self, num_intervals: float = 1.0) -> float | None:
        """The largest value forecast over the next `num_intervals` intervals (>= 1, may be fractional), >= 0;
        None before the first `add`."""
        ...


class ConstantPredictor:
    """The next interval repeats the last one."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def add(self, value: float) -> None:
        self._last = value

    def predict(self, num_intervals: float = 1.0) -> float | None:
        return self._last


class MovingAveragePredictor:
    """Mean of the last `window` values."""

    __slots__ = ("_values",)

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"moving average window must be >= 1, got {window}")
        self._values: deque[float] = deque(maxlen=window)

    def add(self, value: float) -> None:
        self._values.append(value)

    def predict(self, num_intervals: float = 1.0) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None


class HoltPredictor:
    """Holt's double exponential smoothing: a level and a trend, forecast = level + trend.

    level_t = alpha * x_t + (1 - alpha) * (level + trend)
    trend_t = beta * (level_t - level) + (1 - beta) * trend
    The forecast h intervals ahead is level + h * trend: the peak over the next
    k is at h = k on a rising trend, at h = 1 on a falling one. The trend
    starts at 0; forecasts are clamped at 0.
    """

    __slots__ = ("_alpha", "_beta", "_level", "_trend")

    def __init__(self, alpha: float, beta: float) -> None:
        if not (0 < alpha <= 1 and 0 < beta <= 1):
            raise ValueError(f"Holt alpha and beta must be in (0, 1], got {alpha}, {beta}")
        self._alpha, self._beta = alpha, beta
        self._level: float | None = None
        self._trend = 0.0

    def add(self, value: float) -> None:
        if self._level is None:
            self._level = value
            return
        level = self._alpha * value + (1 - self._alpha) * (self._level + self._trend)
        self._trend = self._beta * (level - self._level) + (1 - self._beta) * self._trend
        self._level = level

    def predict(self, num_intervals: float = 1.0) -> float | None:
        if self._level is None:
            return None
        return max(0.0, self._level + (num_intervals if self._trend > 0 else 1.0) * self._trend)


class QuantilePredictor:
    """The `quantile` of the last `window` values (1.0: their maximum), whatever the horizon.

    It holds the recent peak: a heavy interval counts from the moment it shows,
    and the forecast comes down only once it has left the window, so a pool is
    not shrunk between heavy intervals that recur (a trace's long prompts come
    in clusters). It has no trend: a ramp is followed an interval late.
    Quantiles interpolate linearly between the ordered values.
    """

    __slots__ = ("_values", "_quantile")

    def __init__(self, window: int, quantile: float) -> None:
        if window < 1:
            raise ValueError(f"quantile window must be >= 1, got {window}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self._values: deque[float] = deque(maxlen=window)
        self._quantile = quantile

    def add(self, value: float) -> None:
        self._values.append(value)

    def predict(self, num_intervals: float = 1.0) -> float | None:
        if not self._values:
            return None
        ordered = sorted(self._values)
        position = self._quantile * (len(ordered) - 1)
        below = int(position)
        above = min(below + 1, len(ordered) - 1)
        return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def make_predictor(config: PlannerConfig) -> Predictor:
    """A fresh predictor of the kind `config.predictor` names."""
    if config.predictor is PredictorKind.CONSTANT:
        return ConstantPredictor()
    if config.predictor is PredictorKind.MOVING_AVERAGE:
        return MovingAveragePredictor(config.moving_average_window)
    if config.predictor is PredictorKind.QUANTILE:
        return QuantilePredictor(config.quantile_window, config.quantile)
    return HoltPredictor(config.holt_alpha, config.holt_beta)
