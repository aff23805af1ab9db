"""Predictors of the next interval's value (request rate, mean lengths) from past intervals."""

from __future__ import annotations

from collections import deque
from typing import Protocol

from triton_disagg.planner.config import PlannerConfig, PredictorKind


class Predictor(Protocol):
    """Series in, one-step-ahead forecast out. `add` mutates; `predict` does not."""

    def add(self, value: float) -> None: ...

    def predict(self) -> float | None:
        """The next value, >= 0; None before the first `add`."""
        ...


class ConstantPredictor:
    """The next interval repeats the last one."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: float | None = None

    def add(self, value: float) -> None:
        self._last = value

    def predict(self) -> float | None:
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

    def predict(self) -> float | None:
        return sum(self._values) / len(self._values) if self._values else None


class HoltPredictor:
    """Holt's double exponential smoothing: a level and a trend, forecast = level + trend.

    level_t = alpha * x_t + (1 - alpha) * (level + trend)
    trend_t = beta * (level_t - level) + (1 - beta) * trend
    The trend starts at 0; forecasts are clamped at 0.
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

    def predict(self) -> float | None:
        return None if self._level is None else max(0.0, self._level + self._trend)


def make_predictor(config: PlannerConfig) -> Predictor:
    """A fresh predictor of the kind `config.predictor` names."""
    if config.predictor is PredictorKind.CONSTANT:
        return ConstantPredictor()
    if config.predictor is PredictorKind.MOVING_AVERAGE:
        return MovingAveragePredictor(config.moving_average_window)
    return HoltPredictor(config.holt_alpha, config.holt_beta)
