"""Profiler: one worker's prefill and decode performance, for the planner and for `serve --profile`.

    triton-disagg profile [--model PATH] [--output results/profile/profile.json]

Three sweeps on the real engine, in this process (no server):

1. Prefill throughput against the engine's per-step token budget
   (`max_num_batched_tokens`): a queue of prompts of `prefill_input_tokens`
   each, prefilled with that budget (chunked where a prompt does not fit).
   The smallest budget reaching `saturation` (95%) of the peak throughput is
   the budget to run prefill workers with: a larger one buys almost no
   throughput and makes each step, so each prompt's first token, slower.
2. Time to first token of `b` prompts of `L` tokens submitted together (until
   the last of them has its first token), on an engine with that budget.
3. Inter-token latency of `c` requests decoding together at a context of `T`
   tokens: the time of a decode step.

The sweeps run in rounds, each round visiting every point once, and every
point keeps its fastest run (its fastest step, for decode), as `timeit` does:
other processes on a shared machine only ever add time, two cores
oversubscribed by a neighbour slow a step many times over, and a busy spell
then spoils one round of every point rather than all of one.

Writes the profile file `planner.profile.PerformanceProfile` reads (with the
saturating budget and the raw token sweep) and a PNG of the curves.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_disagg.planner.config import KNOWN_DEVICE_KINDS
from triton_disagg.planner.profile import DecodeProfile, PerformanceProfile, PrefillProfile
from triton_disagg.engine.config import EngineConfig, ModelConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams

Progress = Callable[[str], None]


@dataclass(slots=True, frozen=True)
class ProfileSettings:
    """What to sweep. Defaults fit the default model on a laptop CPU in about a minute."""

    model_path: str
    #: "auto" takes CUDA when present, else CPU.
    device: str = "auto"
    #: Device kind written to the profile (one of planner.config.KNOWN_DEVICE_KINDS); None detects it.
    device_kind: str | None = None
    #: Per-step token budgets of the prefill throughput sweep.
    prefill_token_budgets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    #: Prompt length of the prefill throughput sweep.
    prefill_input_tokens: int = 512
    #: Prompt tokens prefilled at each point of the throughput sweep (rounded up to whole prompts);
    #: at least four steps of the largest budget are run whatever this is.
    prefill_sweep_tokens: int = 4096
    #: Prompt lengths of the TTFT grid.
    ttft_input_tokens: tuple[int, ...] = (64, 256, 1024, 2048)
    #: Prompts submitted together at each point of the TTFT grid.
    ttft_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    #: Requests decoding together, ITL grid.
    decode_concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    #: Context lengths (prompt tokens) of the ITL grid.
    decode_context_tokens: tuple[int, ...] = (128, 512, 1024, 2048)
    #: Decode steps timed at each ITL point (after two warm-up steps).
    decode_steps: int = 16
    #: Rounds of every sweep (the prefill sweep adds a warm-up round); each point keeps its fastest.
    repeats: int = 5
    #: Fraction of peak prefill throughput a budget must reach to count as saturating.
    saturation: float = 0.95

    def validate(self) -> None:
        axes = {
            "prefill_token_budgets": self.prefill_token_budgets,
            "ttft_input_tokens": self.ttft_input_tokens,
            "ttft_batch_sizes": self.ttft_batch_sizes,
            "decode_concurrency": self.decode_concurrency,
            "decode_context_tokens": self.decode_context_tokens,
        }
        for name, axis in axes.items():
            if not axis or axis[0] < 1 or any(b <= a for a, b in zip(axis, axis[1:])):
                raise ValueError(f"{name} must be positive and strictly ascending, got {list(axis)}")
        for name in ("prefill_input_tokens", "prefill_sweep_tokens", "decode_steps", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.saturation <= 1:
            raise ValueError(f"saturation must be in (0, 1], got {self.saturation}")
        if self.device_kind is not None and self.device_kind not in KNOWN_DEVICE_KINDS:
            raise ValueError(f"device_kind {self.device_kind!r} is unknown; use one of {', '.join(KNOWN_DEVICE_KINDS)}")


@dataclass(slots=True, frozen=True)
class ProfileResult:
    """A profile and the prefill token sweep it was chosen from."""

    profile: PerformanceProfile
    device: str
    #: (budget, prefill tokens/s) of the token sweep, ascending budgets.
    prefill_sweep: tuple[tuple[int, float], ...]
    settings: ProfileSettings

    @property
    def saturating_batch_tokens(self) -> int:
        assert self.profile.prefill.saturating_batch_tokens is not None  # set by run_profile
        return self.profile.prefill.saturating_batch_tokens

    @property
    def peak_tokens_per_s(self) -> float:
        return max(tokens_per_s for _, tokens_per_s in self.prefill_sweep)

    def to_dict(self) -> dict:
        """The profile file: the planner's fields plus the raw token sweep (which the loader ignores)."""
        return self.profile.to_dict() | {
            "prefill_token_sweep": {
                "input_tokens": self.settings.prefill_input_tokens,
                "batch_tokens": [budget for budget, _ in self.prefill_sweep],
                "tokens_per_s": [round(tokens_per_s, 1) for _, tokens_per_s in self.prefill_sweep],
                "peak_tokens_per_s": round(self.peak_tokens_per_s, 1),
                "saturation": self.settings.saturation,
            },
            "measured_on": {"device": self.device, "torch_threads": torch.get_num_threads()},
        }


def smallest_saturating_batch(
    batch_tokens: Sequence[int], tokens_per_s: Sequence[float], saturation: float = 0.95
) -> int:
    """The smallest batch whose throughput is at least `saturation` times the peak throughput.

    `tokens_per_s[i]` was measured at `batch_tokens[i]`; order does not matter.
    Raises ValueError if the lists are empty or differ in length, a throughput
    is not > 0, or `saturation` is outside (0, 1].
    """
    if not batch_tokens or len(batch_tokens) != len(tokens_per_s):
        raise ValueError(
            f"need one throughput per batch, got {len(batch_tokens)} batches and {len(tokens_per_s)} throughputs"
        )
    if not 0 < saturation <= 1:
        raise ValueError(f"saturation must be in (0, 1], got {saturation}")
    if any(not value > 0 for value in tokens_per_s):
        raise ValueError(f"throughputs must be > 0, got {list(tokens_per_s)}")
    threshold = saturation * max(tokens_per_s)
    return min(batch for batch, value in zip(batch_tokens, tokens_per_s) if value >= threshold)


def run_profile(settings: ProfileSettings, progress: Progress | None = None) -> ProfileResult:
    """Run the three sweeps; reports each point through `progress`. Raises ValueError on a bad setting."""
    settings.validate()
    report = progress or _to_stderr
    probe = EngineConfig(model_path=settings.model_path, device=settings.device)
    device = probe.resolve_device()
    device_kind = settings.device_kind or detect_device_kind(device)
    _check_fits_model(settings, ModelConfig.from_pretrained(settings.model_path).max_position_embeddings)

    sweep = measure_prefill_sweep(settings, device, report)
    saturating = smallest_saturating_batch(settings.prefill_token_budgets, [t for _, t in sweep], settings.saturation)
    report(f"smallest budget within {settings.saturation:.0%} of the peak: {saturating} tokens/step")

    ttft_ms = measure_ttft_grid(settings, device, saturating, report)
    itl_ms = measure_itl_grid(settings, device, report)
    profile = PerformanceProfile(
        model=Path(settings.model_path).name,
        device_kind=device_kind,
        devices_per_worker=1,
        prefill=PrefillProfile(
            input_tokens=tuple(map(float, settings.ttft_input_tokens)),
            batch_sizes=tuple(map(float, settings.ttft_batch_sizes)),
            ttft_ms=ttft_ms,
            saturating_batch_tokens=saturating,
        ),
        decode=DecodeProfile(
            concurrency=tuple(map(float, settings.decode_concurrency)),
            context_tokens=tuple(map(float, settings.decode_context_tokens)),
            itl_ms=itl_ms,
        ),
    )
    return ProfileResult(profile=profile, device=str(device), prefill_sweep=tuple(sweep), settings=settings)


def measure_prefill_sweep(settings: ProfileSettings, device: torch.device, report: Progress) -> list[tuple[int, float]]:
    """(budget, prompt tokens/s) of an engine stepping with each budget through a queue of prompts."""
    length, budgets = settings.prefill_input_tokens, settings.prefill_token_budgets
    num_prompts = {budget: -(-max(settings.prefill_sweep_tokens, 4 * budget) // length) for budget in budgets}
    # One engine for every budget (one copy of the weights); its step budget is changed between runs,
    # which the scheduler reads at each step.
    engine = LLMEngine(
        _engine_config(
            settings,
            device,
            budgets[-1],
            max_num_seqs=max(64, budgets[-1] // length + 2),
            num_blocks=_blocks_for(max(num_prompts.values()) * (length + 1)) + 1,
        )
    )
    best = dict.fromkeys(budgets, 0.0)
    for run in range(settings.repeats + 1):  # round 0 warms up
        for budget in budgets:
            engine.scheduler.max_num_batched_tokens = budget
            prompts = [_prompt(length, seed=run * 1000 + i) for i in range(num_prompts[budget])]
            tokens_per_s = len(prompts) * length / _time_batch(engine, device, prompts, f"prefill-{run}")
            if run:
                best[budget] = max(best[budget], tokens_per_s)
                report(f"prefill {budget:>6} tokens/step: {tokens_per_s:10.0f} tokens/s"
                       f"  (round {run}/{settings.repeats})")
    return list(best.items())


def measure_ttft_grid(
    settings: ProfileSettings, device: torch.device, budget: int, report: Progress
) -> tuple[tuple[float, ...], ...]:
    """TTFT (ms) of `b` prompts of `L` tokens submitted together, on an engine with `budget` tokens per step."""
    max_batch, max_length = settings.ttft_batch_sizes[-1], settings.ttft_input_tokens[-1]
    engine = LLMEngine(
        _engine_config(
            settings,
            device,
            budget,
            max_num_seqs=max(64, max_batch),
            num_blocks=max_batch * _blocks_for(max_length + 1) + 1,
        )
    )
    _time_batch(engine, device, [_prompt(max_length, seed=0)], "warm-up")
    points = [(length, batch) for length in settings.ttft_input_tokens for batch in settings.ttft_batch_sizes]
    best = dict.fromkeys(points, float("inf"))
    for run in range(1, settings.repeats + 1):
        for length, batch in best:
            prompts = [_prompt(length, seed=1000 * run + i) for i in range(batch)]
            ttft_ms = _time_batch(engine, device, prompts, f"ttft-{run}") * 1e3
            best[length, batch] = min(best[length, batch], ttft_ms)
            report(f"ttft {batch:>3} x {length:>6} tokens at {budget} tokens/step: {ttft_ms:9.1f} ms"
                   f"  (round {run}/{settings.repeats})")
    return tuple(
        tuple(best[length, batch] for batch in settings.ttft_batch_sizes) for length in settings.ttft_input_tokens
    )


def measure_itl_grid(
    settings: ProfileSettings, device: torch.device, report: Progress
) -> tuple[tuple[float, ...], ...]:
    """Decode step time (ms) of `c` requests decoding together at a context of `T` tokens, fastest step.

    A point's prompts are prefilled in one step (so the largest c x T must fit one forward pass):
    chunked over several steps, the first would decode, and finish, while the last still prefill.
    """
    max_concurrency, max_context = settings.decode_concurrency[-1], settings.decode_context_tokens[-1]
    num_decodes = settings.decode_steps + 3  # the prefill's token, two warm-up steps, the timed steps
    engine = LLMEngine(
        _engine_config(
            settings,
            device,
            max_concurrency * max_context,
            max_num_seqs=max_concurrency,
            num_blocks=max_concurrency * _blocks_for(max_context + num_decodes) + 1,
        )
    )
    params = SamplingParams(max_tokens=num_decodes, ignore_eos=True)
    points = [(c, context) for c in settings.decode_concurrency for context in settings.decode_context_tokens]
    best = dict.fromkeys(points, float("inf"))
    for run in range(1, settings.repeats + 1):
        for concurrency, context in points:
            for i in range(concurrency):
                engine.add_request(f"decode-{run}-{i}", _prompt(context, seed=1000 * run + i), params)
            if len(engine.step()) != concurrency:
                raise RuntimeError(f"the {concurrency} prompts of {context} tokens did not prefill in one step")
            for _ in range(2):
                engine.step()
            step_s = []
            for _ in range(settings.decode_steps):
                _sync(device)
                start = time.perf_counter()
                engine.step()
                _sync(device)
                step_s.append(time.perf_counter() - start)
            while engine.has_unfinished_requests():
                engine.step()
            best[concurrency, context] = min(best[concurrency, context], min(step_s) * 1e3)
            report(f"itl {concurrency:>4} requests at {context:>6} tokens: {min(step_s) * 1e3:8.2f} ms"
                   f"  (round {run}/{settings.repeats})")
    return tuple(
        tuple(best[c, context] for context in settings.decode_context_tokens) for c in settings.decode_concurrency
    )


def detect_device_kind(device: torch.device) -> str:
    """The profile's device kind for `device`; ValueError asks for --device-kind when the GPU is not known."""
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for kind in KNOWN_DEVICE_KINDS:
        if kind in name:
            return kind
    raise ValueError(
        f"cannot tell the device kind of {name!r}; pass --device-kind (one of {', '.join(KNOWN_DEVICE_KINDS)})"
    )


def write_outputs(result: ProfileResult, output: Path, plot_path: Path | None) -> None:
    """Write the profile JSON to `output` and, unless `plot_path` is None, the PNG."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    if plot_path is not None:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot(result, plot_path)


def plot(result: ProfileResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profile, settings = result.profile, result.settings
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    budgets = [budget for budget, _ in result.prefill_sweep]
    axes[0].plot(budgets, [t for _, t in result.prefill_sweep], marker="o", label="measured")
    axes[0].axhline(settings.saturation * result.peak_tokens_per_s, color="gray", linestyle="--",
                    label=f"{settings.saturation:.0%} of peak")
    axes[0].axvline(result.saturating_batch_tokens, color="tab:red", linestyle=":",
                    label=f"chosen: {result.saturating_batch_tokens} tokens/step")
    axes[0].set(xscale="log", xlabel="token budget per step", ylabel="prefill tokens/s",
                title=f"Prefill throughput ({settings.prefill_input_tokens}-token prompts)")
    for k, batch in enumerate(profile.prefill.batch_sizes):
        axes[1].plot(profile.prefill.input_tokens, [row[k] for row in profile.prefill.ttft_ms], marker="o",
                     label=f"batch of {batch:g}")
    axes[1].set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="ms",
                title=f"TTFT at {result.saturating_batch_tokens} tokens/step")
    for j, context in enumerate(profile.decode.context_tokens):
        axes[2].plot(profile.decode.concurrency, [row[j] for row in profile.decode.itl_ms], marker="o",
                     label=f"context {context:g}")
    axes[2].set(xscale="log", yscale="log", xlabel="requests decoding together", ylabel="ms",
                title="Inter-token latency")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{profile.model} on {result.device} ({torch.get_num_threads()} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(result: ProfileResult) -> None:
    peak = result.peak_tokens_per_s
    print("prefill: tokens/step   tokens/s  of peak")
    for budget, tokens_per_s in result.prefill_sweep:
        mark = "  <- saturating" if budget == result.saturating_batch_tokens else ""
        print(f"         {budget:>11}  {tokens_per_s:9.0f}  {tokens_per_s / peak:6.1%}{mark}")
    decode = result.profile.decode
    print("decode ITL ms: concurrency x context " + " ".join(f"{c:>8g}" for c in decode.context_tokens))
    for concurrency, row in zip(decode.concurrency, decode.itl_ms):
        print(f"               {concurrency:>11g}          " + " ".join(f"{v:8.2f}" for v in row))


_FIRST_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)
_BLOCK_SIZE = 16


def _engine_config(settings: ProfileSettings, device: torch.device, budget: int, **overrides) -> EngineConfig:
    # Prefix caching off: every prompt is computed in full, whatever ran before it.
    return EngineConfig(
        model_path=settings.model_path,
        device=str(device),
        block_size=_BLOCK_SIZE,
        max_num_batched_tokens=budget,
        enable_prefix_caching=False,
        **overrides,
    )


def _check_fits_model(settings: ProfileSettings, max_model_len: int) -> None:
    longest = {
        "prefill_input_tokens": settings.prefill_input_tokens + 1,
        "ttft_input_tokens": settings.ttft_input_tokens[-1] + 1,
        "decode_context_tokens": settings.decode_context_tokens[-1] + settings.decode_steps + 3,
    }
    for name, num_tokens in longest.items():
        if num_tokens > max_model_len:
            raise ValueError(
                f"{name} needs {num_tokens} tokens of context but the model's window is {max_model_len}; "
                "profile shorter lengths"
            )


def _blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // _BLOCK_SIZE)


def _time_batch(engine: LLMEngine, device: torch.device, prompts: list[list[int]], tag: str) -> float:
    """Seconds from submitting `prompts` together until the last has its first token (the engine is idle after)."""
    _sync(device)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, _FIRST_TOKEN)
    while engine.has_unfinished_requests():
        engine.step()
    _sync(device)
    return time.perf_counter() - start


def _prompt(num_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (num_tokens,), generator=generator).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _to_stderr(message: str) -> None:
    print(f"[profile] {message}", file=sys.stderr, flush=True)
