"""Profile data of one model on one device kind, and interpolation over it.

Prefill: time to first token measured on a grid of (input length, batch of
prompts prefilled together); a worker's prefill throughput at a batch is
`batch * input_tokens / ttft`. Decode: inter-token latency on a grid of
(concurrent requests, context length). Between grid points values are
interpolated linearly (bilinearly on grids); outside the grid they are held
at the nearest edge, so a profile should cover the lengths served.

File format (JSON, written by `triton-disagg profile`, version 1):

    {"version": 1, "model": "...", "device_kind": "h100", "devices_per_worker": 1,
     "prefill": {"input_tokens": [...], "batch_sizes": [...], "ttft_ms": [[...], ...],
                 "saturating_batch_tokens": 256},
     "decode": {"concurrency": [...], "context_tokens": [...], "itl_ms": [[...], ...]}}

`prefill.ttft_ms[i][k]` is at `input_tokens[i]` and `batch_sizes[k]`;
`decode.itl_ms[i][j]` at `concurrency[i]` and `context_tokens[j]`. Axes are
strictly ascending. `prefill.saturating_batch_tokens` (optional; absent in
older files) is the smallest per-step token budget at which a prefill worker
reaches 95% of its peak throughput: the budget to run prefill workers with.
Other keys (the profiler's raw sweeps) are ignored.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triton_disagg.planner.config import KNOWN_DEVICE_KINDS

PROFILE_VERSION = 1


@dataclass(slots=True, frozen=True)
class PrefillProfile:
    input_tokens: tuple[float, ...]
    batch_sizes: tuple[float, ...]
    ttft_ms: tuple[tuple[float, ...], ...]  # (len(input_tokens), len(batch_sizes))
    #: Smallest engine step token budget reaching 95% of peak prefill throughput; None if not profiled.
    saturating_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        _check_grid("prefill", "input_tokens", self.input_tokens, "batch_sizes", self.batch_sizes, self.ttft_ms)
        if self.saturating_batch_tokens is not None and self.saturating_batch_tokens < 1:
            raise ValueError(f"profile prefill.saturating_batch_tokens must be >= 1, got {self.saturating_batch_tokens}")

    def ttft_at_ms(self, input_tokens: float, batch_size: float = 1) -> float:
        """TTFT of a batch of `batch_size` prompts of `input_tokens` each, prefilled together."""
        return bilinear(self.input_tokens, self.batch_sizes, self.ttft_ms, input_tokens, batch_size)

    def max_batch_within(self, input_tokens: float, ttft_ms: float) -> int | None:
        """Largest whole batch (up to the profiled one) whose TTFT is <= `ttft_ms`; None if not even 1."""
        best = None
        for batch in range(1, int(self.batch_sizes[-1]) + 1):
            if self.ttft_at_ms(input_tokens, batch) <= ttft_ms:
                best = batch
        return best

    def throughput_tokens_per_s(self, input_tokens: float, batch_size: float = 1) -> float:
        """Prompt tokens a worker prefills per second running batches of `batch_size`."""
        return batch_size * input_tokens * 1000.0 / self.ttft_at_ms(input_tokens, batch_size)


@dataclass(slots=True, frozen=True)
class DecodeProfile:
    concurrency: tuple[float, ...]
    context_tokens: tuple[float, ...]
    itl_ms: tuple[tuple[float, ...], ...]  # (len(concurrency), len(context_tokens))

    def __post_init__(self) -> None:
        _check_grid("decode", "concurrency", self.concurrency, "context_tokens", self.context_tokens, self.itl_ms)

    def itl_at_ms(self, concurrency: float, context_tokens: float) -> float:
        """ITL of a worker running `concurrency` requests of `context_tokens` each."""
        return bilinear(self.concurrency, self.context_tokens, self.itl_ms, concurrency, context_tokens)

    def max_concurrency_within(self, context_tokens: float, itl_ms: float) -> int | None:
        """Largest whole concurrency (up to the profiled one) with ITL <= `itl_ms`; None if not even 1."""
        best = None
        for concurrency in range(1, int(self.concurrency[-1]) + 1):
            if self.itl_at_ms(concurrency, context_tokens) <= itl_ms:
                best = concurrency
        return best


@dataclass(slots=True, frozen=True)
class PerformanceProfile:
    """Prefill and decode performance of one worker of `model` on `device_kind`."""

    model: str
    device_kind: str
    devices_per_worker: int
    prefill: PrefillProfile
    decode: DecodeProfile

    def __post_init__(self) -> None:
        if self.device_kind not in KNOWN_DEVICE_KINDS:
            raise ValueError(
                f"profile device_kind {self.device_kind!r} is unknown; use one of {', '.join(KNOWN_DEVICE_KINDS)}"
            )
        if self.devices_per_worker < 1:
            raise ValueError(f"profile devices_per_worker must be >= 1, got {self.devices_per_worker}")

    def to_dict(self) -> dict:
        data = {
            "version": PROFILE_VERSION,
            "model": self.model,
            "device_kind": self.device_kind,
            "devices_per_worker": self.devices_per_worker,
            "prefill": {
                "input_tokens": list(self.prefill.input_tokens),
                "batch_sizes": list(self.prefill.batch_sizes),
                "ttft_ms": [list(row) for row in self.prefill.ttft_ms],
            },
            "decode": {
                "concurrency": list(self.decode.concurrency),
                "context_tokens": list(self.decode.context_tokens),
                "itl_ms": [list(row) for row in self.decode.itl_ms],
            },
        }
        if self.prefill.saturating_batch_tokens is not None:
            data["prefill"]["saturating_batch_tokens"] = self.prefill.saturating_batch_tokens
        return data

    @classmethod
    def from_dict(cls, data: dict) -> PerformanceProfile:
        """Parse a profile; ValueError names the missing or bad field."""
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(
                f"profile version {data.get('version')!r} is not supported (expected {PROFILE_VERSION}); "
                f"re-run `triton-disagg profile`"
            )
        try:
            prefill, decode = data["prefill"], data["decode"]
            saturating = prefill.get("saturating_batch_tokens")
            return cls(
                model=str(data["model"]),
                device_kind=str(data["device_kind"]),
                devices_per_worker=int(data.get("devices_per_worker", 1)),
                prefill=PrefillProfile(
                    input_tokens=tuple(float(x) for x in prefill["input_tokens"]),
                    batch_sizes=tuple(float(x) for x in prefill["batch_sizes"]),
                    ttft_ms=tuple(tuple(float(x) for x in row) for row in prefill["ttft_ms"]),
                    saturating_batch_tokens=None if saturating is None else int(saturating),
                ),
                decode=DecodeProfile(
                    concurrency=tuple(float(x) for x in decode["concurrency"]),
                    context_tokens=tuple(float(x) for x in decode["context_tokens"]),
                    itl_ms=tuple(tuple(float(x) for x in row) for row in decode["itl_ms"]),
                ),
            )
        except KeyError as missing:
            raise ValueError(
                f"profile is missing {missing.args[0]!r}; re-run `triton-disagg profile` to write a complete one"
            ) from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PerformanceProfile:
        """Read a profile file; ValueError if it is absent or malformed."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"profile file {str(path)!r} does not exist; run `triton-disagg profile` to write it")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"profile file {str(path)!r} is not valid JSON ({error}); re-run the profiler") from None
        return cls.from_dict(data)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) over ascending `xs`, held at the edges outside them."""
    if x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, x) - 1
    t = (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[i] + t * (ys[i + 1] - ys[i])


def bilinear(
    xs: Sequence[float], ys: Sequence[float], zs: Sequence[Sequence[float]], x: float, y: float
) -> float:
    """z(x, y) on the grid `zs[i][j]` at (xs[i], ys[j]), bilinear inside, held at the edges."""
    return interpolate(xs, [interpolate(ys, row, y) for row in zs], x)


def _check_grid(
    section: str, x_name: str, xs: Sequence[float], y_name: str, ys: Sequence[float], zs: Sequence[Sequence[float]]
) -> None:
    for name, axis in ((x_name, xs), (y_name, ys)):
        if not axis:
            raise ValueError(f"profile {section}.{name} is empty; the profile needs at least one point")
        if any(b <= a for a, b in zip(axis, axis[1:])) or axis[0] <= 0:
            raise ValueError(f"profile {section}.{name} must be positive and strictly ascending, got {list(axis)}")
    if len(zs) != len(xs) or any(len(row) != len(ys) for row in zs):
        raise ValueError(
            f"profile {section} grid must be {len(xs)} rows ({x_name}) of {len(ys)} values ({y_name})"
        )
    if any(not math.isfinite(z) or z <= 0 for row in zs for z in row):
        raise ValueError(f"profile {section} latencies must be finite and > 0")
