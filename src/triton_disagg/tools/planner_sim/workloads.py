"""Arrivals the planner simulator replays: (arrival s, input tokens, output tokens), sorted by time."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

Arrival = tuple[float, int, int]


def bursty_arrivals(seed: int = 0, duration_s: float = 2400.0, base_rate_per_s: float = 1.5) -> list[Arrival]:
    """Poisson arrivals; the rate ramps over 90 s to 4x the base for 3-5 min bursts, then back."""
    rng = random.Random(seed)
    bursts = [(300.0, 240.0, 4.0), (1000.0, 300.0, 3.0), (1700.0, 180.0, 5.0)]  # (start, length, factor)

    def rate_at(t: float) -> float:
        factor = 1.0
        for start, length, peak in bursts:
            ramp = 90.0
            if start - ramp <= t < start:
                factor = max(factor, 1 + (peak - 1) * (t - start + ramp) / ramp)
            elif start <= t < start + length:
                factor = max(factor, peak)
            elif start + length <= t < start + length + ramp:
                factor = max(factor, peak - (peak - 1) * (t - start - length) / ramp)
        return base_rate_per_s * factor

    top = base_rate_per_s * max(peak for *_, peak in bursts)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(top)  # thinning of a Poisson process with a varying rate
        if t >= duration_s:
            return arrivals
        if rng.random() < rate_at(t) / top:
            input_tokens = int(min(120_000, max(64, rng.lognormvariate(math.log(6000), 0.8))))
            output_tokens = int(min(2000, max(2, rng.lognormvariate(math.log(250), 0.6))))
            arrivals.append((t, input_tokens, output_tokens))


def mooncake_arrivals(path: Path) -> list[Arrival]:
    """Mooncake trace rows: timestamp (ms), input_length, output_length."""
    arrivals = []
    with path.open() as lines:
        for line in lines:
            row = json.loads(line)
            arrivals.append((row["timestamp"] / 1000.0, int(row["input_length"]), max(1, int(row["output_length"]))))
    return sorted(arrivals)
