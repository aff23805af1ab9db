"""EPLB benchmark: expert balance and per-rank MoE time on a skewed workload, before and after rebalancing.

    python -m triton_disagg.tools.bench_eplb [--ranks 4] [--redundant 0,4,8] [--experts 16] [--out results/bench_eplb]

One run, on a Mixtral-style checkpoint with `--experts` experts (top-2), served
by `--ranks` real expert-parallel rank processes, for each number of redundant
expert slots:

0. *calibration*: on a single-rank engine, the pair of bytes whose random
   prompts route most unevenly (among the bytes whose own repeated prompts do)
   makes the alphabet of the skewed workload: a narrow domain drives a few
   experts per layer hot;
1. *before*: the skewed workload (prefill-heavy prompts of random bytes from
   that alphabet) on the placement a server starts with;
2. *live move*: the workload again; once every prompt is prefilled, the
   balancer's plan for the loads of (1) is applied, one layer per step
   boundary, while the requests decode (a moving step against the median
   decode step without a move is the stall);
3. *after*: the workload again on the new placement.

Balancedness (mean over max rank load) per layer is measured from the tokens
each rank's slots actually ran, and the MoE time per rank is the CPU time its
expert slots took per step. Prefix caching is off, so (1) and (3) compute the
same tokens; every phase must produce the same output tokens. Prints a table
and writes `<out>.json` and `<out>.png` (a heat map of expert load per layer).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from triton_disagg.checkpoint import make_model
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.eplb import decide_rebalance, initial_placement, rebalance_experts
from triton_disagg.engine.expert_parallel import RankReport
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams
from triton_disagg.tools.report import write_report

CANDIDATE_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789 .,"


def progress(message: str) -> None:
    print(f"[bench_eplb] {message}", file=sys.stderr, flush=True)


def calibrate_alphabet(model_path: str, device: str, ranks: int, num_candidates: int = 6) -> bytes:
    """The pair of bytes whose random prompts balance worst on the start placement of `ranks` ranks.

    Pairs are drawn from the `num_candidates` bytes whose own repeated prompts balance worst.
    """
    engine = LLMEngine(EngineConfig(model_path=model_path, device=device, enable_prefix_caching=False, num_blocks=128))
    config = engine.model_config
    start = initial_placement(config.num_hidden_layers, config.num_experts, config.num_experts + ranks, ranks)

    def score(prompts: list[list[int]]) -> float:
        before = engine.model.expert_token_counts().clone()
        engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))
        return float(start.balancedness(engine.model.expert_token_counts() - before).mean())

    singles = sorted(CANDIDATE_BYTES, key=lambda byte: score([[byte] * 32]))[:num_candidates]
    pairs = [bytes((a, b)) for i, a in enumerate(singles) for b in singles[i + 1 :]]
    return min(pairs, key=lambda pair: score(skewed_prompts(pair, 4, 64, seed=1)))


def skewed_prompts(alphabet: bytes, num_prompts: int, num_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(alphabet) for _ in range(num_tokens)] for _ in range(num_prompts)]


def run_workload(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, on_step=None) -> tuple[list[list[int]], list[float]]:
    """Every prompt to completion; output tokens in prompt order and the wall time of each step.

    `on_step(step_index)` runs before each step.
    """
    ids = [f"r{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts):
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
    step_s: list[float] = []
    while engine.has_unfinished_requests():
        if on_step is not None:
            on_step(len(step_s))
        started = time.perf_counter()
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
        step_s.append(time.perf_counter() - started)
    return [outputs[request_id] for request_id in ids], step_s


def rank_figures(start: list[RankReport], end: list[RankReport], num_steps: int) -> dict:
    """Tokens each rank's slots ran per layer, and their expert CPU ms per step, between two reports.

    Every MoE layer waits for its slowest rank, so a step's MoE time is the sum over layers of
    the slowest rank's time (`moe_ms_per_step`); with perfect balance it would be the sum of
    the mean rank's (`balanced_moe_ms_per_step`).
    """
    tokens = torch.tensor([[sum(e) - sum(s) for s, e in zip(a.slot_tokens, b.slot_tokens)] for a, b in zip(start, end)],
                          dtype=torch.float64).T  # (L, R)
    ms = torch.tensor([[1e3 * (e - s) / num_steps for s, e in zip(a.compute_s, b.compute_s)] for a, b in zip(start, end)],
                      dtype=torch.float64).T  # (L, R)
    balancedness = (tokens.mean(dim=1) / tokens.max(dim=1).values).tolist()
    return {
        "layer_rank_tokens": tokens.tolist(),
        "layer_rank_expert_ms_per_step": ms.tolist(),
        "balancedness": balancedness,
        "mean_balancedness": statistics.fmean(balancedness),
        "min_balancedness": min(balancedness),
        "rank_expert_ms_per_step": ms.sum(dim=0).tolist(),
        "moe_ms_per_step": float(ms.max(dim=1).values.sum()),
        "balanced_moe_ms_per_step": float(ms.mean(dim=1).sum()),
    }


def bench_redundancy(model_path: str, device: str, ranks: int, redundant: int, prompts: list[list[int]], params: SamplingParams) -> dict:
    progress(f"{redundant} redundant experts: starting {ranks} ranks")
    engine = LLMEngine(EngineConfig(
        model_path=model_path, device=device, ep_size=ranks, eplb_redundant_experts=redundant, eplb_window=100_000,
        enable_prefix_caching=False, num_blocks=1024, max_num_seqs=len(prompts),
    ))
    try:
        eplb = engine.eplb
        run_workload(engine, prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm up
        initial = eplb.placement
        start_reports, start_load = eplb.rank_reports(), eplb.window.total_load()
        before_tokens, before_steps = run_workload(engine, prompts, params)
        before_reports, before_load = eplb.rank_reports(), eplb.window.total_load()
        load = before_load - start_load  # (L, E) the skewed workload's expert load
        decision = decide_rebalance(load, eplb.placement, threshold=1.0)
        progress(f"{redundant} redundant: {decision.reason}, planned mean balancedness {decision.balancedness:.3f} -> {decision.planned_balancedness}")
        move_steps: list[int] = []
        applied_at: list[int] = []

        def apply_once_decoding(step: int) -> None:
            """Start the move once every prompt is prefilled, so moving steps compare with plain decode steps."""
            stats = engine.stats()
            if not applied_at and step > 0 and stats.num_waiting == 0 and stats.num_prefilling_tokens == 0:
                eplb.apply(decision)
                applied_at.append(step)
            if eplb.is_moving:
                move_steps.append(step)

        live_tokens, live_steps = run_workload(engine, prompts, params, on_step=apply_once_decoding)
        after_start = eplb.rank_reports()
        after_tokens, after_steps = run_workload(engine, prompts, params)
        after_reports = eplb.rank_reports()
        decode_steps = [s for i, s in enumerate(live_steps) if applied_at and i >= applied_at[0] and i not in move_steps]
        normal_step_s = statistics.median(decode_steps) if decode_steps else 0.0
        return {
            "redundant_experts": redundant,
            "num_slots": initial.num_slots,
            "decision": decision.reason,
            "predicted_before": decision.balancedness,
            "predicted_after": decision.planned_balancedness,
            "initial_placement": initial.physical_to_logical.tolist(),
            "final_placement": eplb.placement.physical_to_logical.tolist(),
            "before": rank_figures(start_reports, before_reports, len(before_steps)),
            "after": rank_figures(after_start, after_reports, len(after_steps)),
            "live_move": {
                "layers_moved": len(move_steps),
                "moved_slots": eplb.stats.num_moved_slots,
                "move_ms_per_layer": 1e3 * eplb.stats.rearrangement_s / max(1, len(move_steps)),
                "max_move_ms": 1e3 * eplb.stats.max_stall_s,
                "step_ms_with_move": [1e3 * live_steps[i] for i in move_steps],
                "step_ms_without": 1e3 * normal_step_s,
                "stall_ms_per_layer": 1e3 * (statistics.median(live_steps[i] for i in move_steps) - normal_step_s) if move_steps else 0.0,
                "requests_in_flight": len(prompts),
            },
            "tokens_identical": before_tokens == live_tokens == after_tokens,
            "load": load.tolist(),
        }
    finally:
        engine.shutdown()


def planner_sweep(load: torch.Tensor, ranks: int) -> list[dict]:
    """Predicted balancedness on `load` for every redundancy the ranks allow: start placement against plan."""
    num_layers, num_experts = load.shape
    rows = []
    for slots in range(num_experts, num_experts * ranks + 1, ranks):
        if slots % ranks:
            continue
        start = initial_placement(num_layers, num_experts, slots, ranks).balancedness(load)
        plan = rebalance_experts(load, slots, ranks).balancedness(load)
        rows.append({"redundant_experts": slots - num_experts, "initial": float(start.mean()), "planned": float(plan.mean())})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    load = torch.tensor(runs[0]["load"], dtype=torch.float64)
    share = (load / load.sum(dim=1, keepdim=True)).numpy()
    image = axes[0].imshow(share, aspect="auto", cmap="viridis")
    axes[0].set(xlabel="logical expert", ylabel="layer", title="Expert load share per layer (skewed workload)")
    axes[0].set_yticks(range(share.shape[0]))
    fig.colorbar(image, ax=axes[0], fraction=0.046)
    layers = range(load.shape[0])
    width = 0.8 / (len(runs) + 1)
    axes[1].bar([x - 0.4 + width / 2 for x in layers], runs[0]["before"]["balancedness"], width, label=f"before ({runs[0]['redundant_experts']} redundant)", color="grey")
    for i, run in enumerate(runs, start=1):
        axes[1].bar([x - 0.4 + width * (i + 0.5) for x in layers], run["after"]["balancedness"], width, label=f"after, {run['redundant_experts']} redundant")
    axes[1].axhline(0.85, color="black", linestyle="--", linewidth=1, label="target 0.85")
    axes[1].set(xlabel="layer", ylabel="balancedness (mean / max rank load)", ylim=(0, 1.05), title="Measured balancedness per layer")
    axes[1].set_xticks(list(layers))
    axes[1].legend(fontsize=7, loc="lower right")
    target = next((r for r in runs if r["redundant_experts"] == results["ranks"]), runs[-1])
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        ms = torch.tensor(target[phase]["layer_rank_expert_ms_per_step"])  # (L, R)
        axes[2].bar([x + offset for x in layers], ms.max(dim=1).values.tolist(), 0.4, label=f"{phase}: slowest rank")
        axes[2].plot([x + offset for x in layers], ms.mean(dim=1).tolist(), "k_", markersize=14)
    axes[2].plot([], [], "k_", markersize=14, label="mean rank")
    axes[2].set(xlabel="layer", ylabel="expert CPU ms per step",
                title=f"MoE time per layer, {target['redundant_experts']} redundant experts")
    axes[2].set_xticks(list(layers))
    axes[2].legend(fontsize=8)
    fig.suptitle(f"EPLB on {results['num_experts']} experts, top-{results['top_k']}, {results['ranks']} ranks ({results['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(results: dict) -> None:
    print(f"\n{results['num_experts']} experts top-{results['top_k']} over {results['ranks']} ranks, {results['num_prompts']} prompts "
          f"x {results['prompt_tokens']}+{results['max_tokens']} tokens, {results['workload']}; balancedness from tokens per rank, "
          "MoE ms = sum over layers of the slowest rank's expert CPU time per step")
    print("redundant  slots  balancedness mean (min)       MoE ms/step (balanced)           stall ms  tokens")
    print("                  before        after           before         after             /layer    identical")
    for r in results["runs"]:
        b, a, m = r["before"], r["after"], r["live_move"]
        print(
            f"{r['redundant_experts']:>9}  {r['num_slots']:>5}  {b['mean_balancedness']:.3f} ({b['min_balancedness']:.2f})  "
            f"{a['mean_balancedness']:.3f} ({a['min_balancedness']:.2f})  "
            f"{b['moe_ms_per_step']:6.1f} ({b['balanced_moe_ms_per_step']:5.1f})  {a['moe_ms_per_step']:6.1f} ({a['balanced_moe_ms_per_step']:5.1f})  "
            f"{m['stall_ms_per_layer']:8.1f}   {str(r['tokens_identical']):>9}"
        )
    print("\nlive move, requests in flight: steps with a layer moving against the median step without (stall = the difference)")
    for r in results["runs"]:
        m = r["live_move"]
        moving = ", ".join(f"{x:.0f}" for x in m["step_ms_with_move"])
        print(f"{r['redundant_experts']:>9} redundant: {m['moved_slots']} slots in {m['layers_moved']} layers; steps {moving} ms "
              f"vs {m['step_ms_without']:.0f} ms; the move itself {m['move_ms_per_layer']:.0f} ms/layer (max {m['max_move_ms']:.0f})")
    print("\nplanner alone on the measured load (predicted mean balancedness):")
    print("redundant  start placement  planned")
    for row in results["planner_sweep"]:
        print(f"{row['redundant_experts']:>9}  {row['initial']:15.3f}  {row['planned']:7.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="EPLB: expert balance and per-rank MoE time before and after rebalancing.")
    parser.add_argument("--ranks", type=int, default=4, help="expert-parallel ranks (processes)")
    parser.add_argument("--redundant", default="0,4,8", help="redundant expert slots to compare, comma-separated")
    parser.add_argument("--experts", type=int, default=16, help="experts per layer of the benchmark checkpoint")
    parser.add_argument("--hidden-size", type=int, default=256, help="hidden size of the benchmark checkpoint")
    parser.add_argument("--intermediate-size", type=int, default=1024,
                        help="expert width; wide enough that an expert's time follows its tokens, not per-call overhead")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (rank r on GPU r)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_eplb"), help="output path without extension")
    args = parser.parse_args(argv)

    overrides = {"num_local_experts": args.experts, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
                 "head_dim": args.hidden_size // 4}
    model_path = str(make_model(Path(tempfile.mkdtemp()) / "moe-bench", "moe", config_overrides=overrides))
    progress("calibrating the skewed workload's alphabet")
    alphabet = calibrate_alphabet(model_path, args.device, args.ranks)
    prompts = skewed_prompts(alphabet, args.prompts, args.prompt_tokens)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results: dict = {
        "ranks": args.ranks, "num_experts": args.experts, "top_k": 2, "device": args.device,
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens,
        "workload": f"prompts of random bytes from {alphabet.decode()!r}",
        "runs": [],
    }
    for redundant in (int(r) for r in args.redundant.split(",")):
        results["runs"].append(bench_redundancy(model_path, args.device, args.ranks, redundant, prompts, params))
    results["planner_sweep"] = planner_sweep(torch.tensor(results["runs"][0]["load"], dtype=torch.float64), args.ranks)
    write_report(results, args.out, plot, print_table)


if __name__ == "__main__":
    main()
