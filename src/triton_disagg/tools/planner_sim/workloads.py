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


#: The shifting workload's phases: (start s, requests/s, median prompt tokens, median output tokens).
SHIFTING_PHASES = (
    (0.0, 3.0, 4000, 300),  # balanced
    (300.0, 8.0, 1500, 2000),  # long outputs: decode is the bottleneck
    (900.0, 2.5, 24000, 100),  # long prompts: prefill is the bottleneck
    (1500.0, 8.0, 1500, 2000),  # long outputs again
    (2100.0, 3.0, 4000, 300),  # balanced
)
SHIFTING_DURATION_S = 2400.0
#: Seconds over which one phase's mix gives way to the next.
SHIFTING_BLEND_S = 60.0


def shifting_arrivals(seed: int = 0) -> list[Arrival]:
    """Poisson arrivals whose mix of prompt and output lengths moves the load between the pools.

    Phases of SHIFTING_PHASES follow each other, each blending into the next
    over SHIFTING_BLEND_S (rate and the share of requests drawn from each
    phase move linearly). Lengths are lognormal around the phase's medians
    (sigma 0.4 for prompts, 0.5 for outputs); prompts are capped at 40,000
    tokens, which the synthetic profile prefills alone within 2.6 s.
    """
    rng = random.Random(seed)

    def phase_at(t: float) -> tuple[int, float]:
        """Index of the phase in force at `t` and the share (0-1) of the next one blending in."""
        index = max(i for i, phase in enumerate(SHIFTING_PHASES) if phase[0] <= t)
        if index + 1 < len(SHIFTING_PHASES):
            blend_from_s = SHIFTING_PHASES[index + 1][0] - SHIFTING_BLEND_S
            if t >= blend_from_s:
                return index, (t - blend_from_s) / SHIFTING_BLEND_S
        return index, 0.0

    top = max(rate for _, rate, _, _ in SHIFTING_PHASES)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(top)  # thinning, as in bursty_arrivals
        if t >= SHIFTING_DURATION_S:
            return arrivals
        index, share = phase_at(t)
        current, following = SHIFTING_PHASES[index], SHIFTING_PHASES[min(index + 1, len(SHIFTING_PHASES) - 1)]
        rate = (1 - share) * current[1] + share * following[1]
        if rng.random() >= rate / top:
            continue
        # Each phase contributes requests in proportion to its share of the blended rate.
        phase = following if rng.random() < share * following[1] / rate else current
        input_tokens = int(min(40_000, max(64, rng.lognormvariate(math.log(phase[2]), 0.4))))
        output_tokens = int(min(8000, max(2, rng.lognormvariate(math.log(phase[3]), 0.5))))
        arrivals.append((t, input_tokens, output_tokens))
