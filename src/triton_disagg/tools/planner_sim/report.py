"""What the planner simulator reports: per-policy results, the table, and pools over time."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Policies drawn in the plots (static_mean, far off its SLOs, would only squash the axes).
PLOTTED_POLICIES = ("static_peak", "load", "slo_constant", "slo_holt", "slo_quantile")


@dataclass(slots=True)
class Timeline:
    """One policy's run, tick by tick."""

    at_s: list[float] = field(default_factory=list)
    num_prefill_workers: list[int] = field(default_factory=list)
    num_decode_workers: list[int] = field(default_factory=list)
    #: Devices held at the tick: loaded workers, those draining or unloading included.
    num_devices: list[int] = field(default_factory=list)
    ttft_p99_ms: list[float | None] = field(default_factory=list)
    #: Prompt and output tokens of the interval's arrivals, per second (the load each pool gets).
    prompt_tokens_per_s: list[float] = field(default_factory=list)
    output_tokens_per_s: list[float] = field(default_factory=list)


@dataclass(slots=True)
class PolicyResult:
    workload: str
    policy: str
    #: Requests that arrived after the warm-up: the ones the latency figures count.
    num_requests: int
    slo_attainment_pct: float
    #: Over every request, those of the warm-up too.
    slo_attainment_all_pct: float
    ttft_attainment_pct: float
    itl_attainment_pct: float
    device_s: float
    device_s_vs_static_peak: float
    max_devices: int
    #: The planner's device budget (None for the static splits, which hold what they are given).
    device_budget: int | None
    #: Whether the prefill and the decode pool each changed size during the run.
    prefill_changed: bool
    decode_changed: bool
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    num_scale_events: int


def print_table(results: list[PolicyResult]) -> None:
    header = (
        f"{'workload':<9} {'policy':<26} {'SLO %':>6} {'all %':>6} {'TTFT %':>6} {'ITL %':>6} {'dev-s':>9} "
        f"{'vs peak':>7} {'max dev':>7} {'budget':>6} {'P/D move':>8} {'TTFT p99 ms':>11} {'ITL p99 ms':>10} {'events':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        moves = f"{'P' if r.prefill_changed else '-'}/{'D' if r.decode_changed else '-'}"
        print(
            f"{r.workload:<9} {r.policy:<26} {r.slo_attainment_pct:6.1f} {r.slo_attainment_all_pct:6.1f} "
            f"{r.ttft_attainment_pct:6.1f} {r.itl_attainment_pct:6.1f} {r.device_s:9.0f} {r.device_s_vs_static_peak:7.2f} "
            f"{r.max_devices:7d} {r.device_budget or '-':>6} {moves:>8} {r.ttft_p99_ms:11.0f} {r.itl_p99_ms:10.1f} "
            f"{r.num_scale_events:6d}"
        )


def plot(timelines: dict[str, Timeline], ttft_ms: float, device_budget: int, path: Path, title: str) -> None:
    """Five panels over time: the load of each pool, prefill and decode workers (loading ones included),
    devices held (draining and unloading workers included), TTFT p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = {name: t for name, t in timelines.items() if name in PLOTTED_POLICIES}
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    first = next(iter(timelines.values()))
    axes[0].plot(first.at_s, [v / 1000 for v in first.prompt_tokens_per_s], color="tab:blue", label="prompt tokens/s")
    axes[0].set_ylabel("prompt ktok/s", color="tab:blue")
    output_axis = axes[0].twinx()
    output_axis.plot(first.at_s, [v / 1000 for v in first.output_tokens_per_s], color="tab:red", label="output tokens/s")
    output_axis.set_ylabel("output ktok/s", color="tab:red")
    for name, timeline in shown.items():
        style = {"linestyle": "--", "color": "black"} if name == "static_peak" else {}
        axes[1].step(timeline.at_s, timeline.num_prefill_workers, where="post", label=name, **style)
        axes[2].step(timeline.at_s, timeline.num_decode_workers, where="post", label=name, **style)
        axes[3].step(timeline.at_s, timeline.num_devices, where="post", label=name, **style)
        points = [(t, v) for t, v in zip(timeline.at_s, timeline.ttft_p99_ms) if v is not None]
        axes[4].plot([t for t, _ in points], [v for _, v in points], label=name, **style)
    axes[1].set_ylabel("prefill workers")
    axes[2].set_ylabel("decode workers")
    axes[3].axhline(device_budget, color="grey", linestyle=":", label="planner budget")
    axes[3].set_ylabel("devices held")
    axes[4].axhline(ttft_ms, color="red", linestyle=":", label="TTFT target")
    axes[4].set_ylabel("TTFT p99 per interval, ms")
    axes[4].set_yscale("log")
    axes[4].set_xlabel("time, s")
    axes[1].legend(fontsize=8, ncol=3)
    axes[3].legend(fontsize=8, ncol=3)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
