"""Expert load statistics, expert parallelism over real rank processes, and live rebalancing on the engine."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.eplb import ExpertPlacement, RebalanceDecision, initial_placement, rebalance_experts
from triton_disagg.engine.expert_load import ExpertLoadWindow
from triton_disagg.engine.expert_parallel import ExpertParallelGroup
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.loader import load_expert_weights, load_model
from triton_disagg.engine.moe import ExpertParallelMoe, ExpertSlots, LocalExchange, assign_slots, route_tokens
from triton_disagg.engine.params import SamplingParams

GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def make_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**({"model_path": str(path), "device": "cpu", "num_blocks": 128} | overrides)))


def prompts(lengths: list[int], seed: int = 3) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


BATCH = prompts([5, 40, 17, 61, 9])


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank():
    """Rank 0 and its child rank each on one thread: two ranks fill the two cores of a CI machine without
    oversubscribing them (the child ranks take cores / ranks threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_moe_model) -> list[list[int]]:
    """Greedy tokens of the single-rank engine (itself checked against transformers in test_engine_vs_hf)."""
    return make_engine(tiny_moe_model).generate(BATCH, GREEDY)


@pytest.fixture(scope="module")
def ep_engine(tiny_moe_model):
    """Two ranks (this process and one child), 4 experts + 2 redundant slots: 3 slots per rank."""
    engine = make_engine(tiny_moe_model, ep_size=2, eplb_redundant_experts=2)
    yield engine
    engine.shutdown()


def router_choices(engine: LLMEngine) -> list[list[torch.Tensor]]:
    """Hooks every MoE layer's gate; the returned lists fill with each step's top-k expert ids."""
    choices: list[list[torch.Tensor]] = []
    for layer in engine.model.model.layers:
        seen: list[torch.Tensor] = []
        top_k = layer.block_sparse_moe.top_k
        layer.block_sparse_moe.gate.register_forward_hook(lambda m, i, out, seen=seen, k=top_k: seen.append(route_tokens(out, k, out.dtype)[1]))
        choices.append(seen)
    return choices


def test_assign_slots_spreads_each_expert_over_its_replicas():
    # Slots: expert 0 in 0 and 3, expert 1 in 1, expert 2 in 2 and 4, expert 3 in 5.
    moe = ExpertParallelMoe(torch.nn.Linear(8, 4, bias=False), 0, 2, LocalExchange([]), torch.tensor([0, 1, 2, 0, 2, 3]))
    top_experts = torch.tensor([[0, 1], [0, 2], [0, 1], [2, 0]])
    counts = torch.bincount(top_experts.flatten(), minlength=4)
    slots = assign_slots(top_experts, moe.logical_to_physical, moe.replica_counts, counts)
    # Expert 0's 1st..4th tokens (row by row) alternate slots 0, 3, 0, 3; expert 2's go to 2, then 4.
    assert slots.tolist() == [[0, 1], [3, 2], [0, 1], [4, 3]]


def test_expert_load_window_keeps_the_last_steps_and_the_total():
    window = ExpertLoadWindow(num_layers=1, num_experts=2, window_steps=2)
    for cumulative in ([[1, 0]], [[1, 2]], [[4, 2]]):  # steps of (1, 0), (0, 2), (3, 0)
        window.record(torch.tensor(cumulative))
    assert window.window_load().tolist() == [[3, 2]]
    assert window.total_load().tolist() == [[4, 2]]
    assert window.num_window_steps == 2


@pytest.mark.parametrize(("num_slots", "num_ranks"), [(4, 2), (4, 4), (6, 2), (8, 4), (12, 4)])
def test_sharded_layer_computes_the_single_rank_layer(tiny_moe_model, num_slots, num_ranks):
    """Bitwise with one replica per expert; with replicas an expert's rows are split, and a matmul over
    fewer rows may round differently in the last bits."""
    model = load_model(tiny_moe_model, torch.device("cpu"), torch.float32)
    block = model.model.layers[1].block_sparse_moe
    skewed = torch.tensor([[50.0, 1, 30, 7]])
    row = rebalance_experts(skewed, num_slots, num_ranks).physical_to_logical[0]
    per_rank = num_slots // num_ranks
    ranks = [
        ExpertSlots.stack(
            [{n: getattr(block.experts[e], n).weight.data for n in ("w1", "w2", "w3")} for e in row[r * per_rank : (r + 1) * per_rank].tolist()],
            first_slot=r * per_rank,
        )
        for r in range(num_ranks)
    ]
    sharded = ExpertParallelMoe(block.gate, 1, block.top_k, LocalExchange([[], ranks]), row)
    x = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if num_slots == 4:
            assert torch.equal(sharded(x), block(x))
        else:
            torch.testing.assert_close(sharded(x), block(x), rtol=1e-5, atol=1e-5)
    assert sharded.expert_token_counts.sum().item() == 37 * 2
    # Every routed token ran on exactly one slot.
    assert sum(r.slot_tokens.sum().item() for r in ranks) == 37 * 2


def test_a_rank_reads_its_experts_from_either_checkpoint_layout(tiny_moe_model, tmp_path):
    """Newer transformers store a layer's experts fused: gate_up_proj (E, 2I, H) and down_proj (E, H, I)."""
    legacy = load_file(tiny_moe_model / "model.safetensors")
    fused = {name.replace(".block_sparse_moe.gate.", ".mlp.gate."): t for name, t in legacy.items() if ".experts." not in name}
    for layer in range(4):
        expert = lambda e, w: legacy[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"]  # noqa: E731
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([expert(e, "w1"), expert(e, "w3")]) for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([expert(e, "w2") for e in range(4)])
    save_file(fused, tmp_path / "model.safetensors")
    shutil.copy(tiny_moe_model / "config.json", tmp_path / "config.json")
    wanted = {0: {1, 3}, 2: {0}}
    cpu = torch.device("cpu")
    from_fused = load_expert_weights(tmp_path, wanted, cpu, torch.float32)
    from_legacy = load_expert_weights(tiny_moe_model, wanted, cpu, torch.float32)
    assert sorted(from_fused) == sorted(from_legacy) == [(0, 1), (0, 3), (2, 0)]
    for key, weights in from_legacy.items():
        assert all(torch.equal(from_fused[key][name], weights[name]) for name in ("w1", "w2", "w3"))


def test_statistics_count_exactly_the_routers_top_k_choices(tiny_moe_model):
    engine = make_engine(tiny_moe_model, eplb_window=3, max_num_batched_tokens=32)
    choices = router_choices(engine)
    engine.generate(BATCH[:3], SamplingParams(max_tokens=6, ignore_eos=True))
    expected = torch.stack([torch.bincount(torch.cat(seen).flatten(), minlength=4) for seen in choices])
    assert torch.equal(engine.eplb.window.total_load(), expected)
    last_three = torch.stack([sum(torch.bincount(s.flatten(), minlength=4) for s in seen[-3:]) for seen in choices])
    assert torch.equal(engine.eplb.window.window_load(), last_three)


def test_expert_parallel_output_is_token_identical(ep_engine, reference):
    assert ep_engine.generate(BATCH, GREEDY) == reference
    # The child rank really served: every routed token ran on exactly one rank's slot.
    reports = ep_engine.eplb.rank_reports()
    served = [sum(sum(slots) for slots in (r.slot_tokens[layer] for r in reports)) for layer in range(4)]
    assert served == ep_engine.eplb.window.total_load().sum(dim=1).tolist()
    assert all(sum(r.slot_tokens[0]) > 0 for r in reports)


def test_rebalance_during_generation_loses_no_request_and_changes_no_token(ep_engine, reference):
    eplb = ep_engine.eplb
    before = eplb.stats.num_rearrangements
    # A placement that differs on every layer: each rank swaps in the other's experts.
    current = eplb.placement.physical_to_logical
    target = torch.cat([current[:, 3:], current[:, :3]], dim=1)
    for i, prompt in enumerate(BATCH):
        ep_engine.add_request(f"move-{i}", prompt, GREEDY)
    results: dict[str, list[int]] = {f"move-{i}": [] for i in range(len(BATCH))}
    moved_while_running = 0
    for step in range(10_000):
        if step == 3:
            eplb.apply(RebalanceDecision("rebalance", 0.0, 1.0, _placement(target, eplb), tuple(range(4))))
        moving = eplb.is_moving
        outputs = ep_engine.step()
        if moving and ep_engine.has_unfinished_requests():
            moved_while_running += 1
        for output in outputs:
            results[output.request_id].extend(output.new_token_ids)
        if not ep_engine.has_unfinished_requests():
            break
    assert moved_while_running == 4  # one layer per step boundary, all while requests were generating
    assert eplb.stats.num_rearrangements == before + 1
    assert torch.equal(eplb.placement.physical_to_logical, target)
    assert [results[f"move-{i}"] for i in range(len(BATCH))] == reference
    assert eplb.stats.max_stall_s > 0


def test_live_rebalancing_follows_the_interval(tiny_moe_model, reference):
    # A threshold of 1.0 rearranges whenever the plan is better; the interval checks every 4 steps.
    engine = make_engine(tiny_moe_model, ep_size=2, eplb_redundant_experts=2, eplb_interval=4, eplb_threshold=1.0, eplb_window=16)
    try:
        assert engine.generate(BATCH, GREEDY) == reference
        assert engine.eplb.stats.last_decision in ("rebalance", "no_gain", "balanced")
        assert engine.eplb.stats.num_rearrangements >= 1
        snapshot = engine.eplb.snapshot()
        assert snapshot.physical_to_logical == engine.eplb.placement.physical_to_logical.tolist()
        assert all(0 < b <= 1 for b in snapshot.balancedness)
    finally:
        engine.shutdown()


def test_expert_token_series_stay_bounded(tiny_moe_model):
    engine = make_engine(tiny_moe_model)
    engine.generate(BATCH[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    snapshot = engine.eplb.snapshot()
    per_pair = snapshot.total_tokens_by_label(max_series=16)  # 4 layers x 4 experts fit
    assert len(per_pair) == 16 and per_pair[("2", "3")] == snapshot.total_load[2][3]
    per_expert = snapshot.total_tokens_by_label(max_series=15)
    assert per_expert == {("all", str(e)): sum(row[e] for row in snapshot.total_load) for e in range(4)}


def test_a_rank_that_cannot_start_is_named(tiny_moe_model):
    model = load_model(tiny_moe_model, torch.device("cpu"), torch.float32)
    group = ExpertParallelGroup("/nonexistent/checkpoint", initial_placement(4, 4, 4, 2), torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="rank 1 failed to start: ValueError: model path /nonexistent/checkpoint has no config.json"):
        group.start(model)
    assert all(not _is_alive(pid) for pid in group.pids)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"ep_size": 2, "eplb_redundant_experts": 1}, "5 slots do not split evenly over ep_size 2"),
    ({"ep_size": 2, "eplb_redundant_experts": 6}, "use at most 4"),
    ({"eplb_interval": 10}, "set ep_size > 1 too"),
    ({"ep_size": 2, "eplb_threshold": 1.5}, "eplb_threshold must be in"),
])
def test_bad_expert_parallel_settings_are_named(tiny_moe_model, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_engine(tiny_moe_model, **overrides)


def test_dense_model_refuses_expert_parallelism(tiny_model):
    with pytest.raises(ValueError, match="ep_size 2 needs an MoE checkpoint"):
        make_engine(tiny_model, ep_size=2)


def test_ranks_die_with_a_killed_engine_process(tiny_moe_model):
    """Rank 0 killed outright (as a Triton stub can be): its child ranks see their pipe close and exit."""
    code = (
        "import sys; from triton_disagg.engine.config import EngineConfig; from triton_disagg.engine.llm_engine import LLMEngine\n"
        f"e = LLMEngine(EngineConfig(model_path={str(tiny_moe_model)!r}, device='cpu', num_blocks=16, ep_size=2))\n"
        "print(*e.eplb.group.pids, flush=True); sys.stdin.read()"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
        assert len(pids) == 1 and _is_alive(pids[0])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    deadline_s = time.monotonic() + 30
    while _is_alive(pids[0]) and time.monotonic() < deadline_s:
        time.sleep(0.05)
    assert not _is_alive(pids[0])


def test_shutdown_stops_every_rank(ep_engine):
    pids = ep_engine.eplb.group.pids
    ep_engine.shutdown()
    assert pids and all(not _is_alive(pid) for pid in pids)
    with pytest.raises(RuntimeError, match="closed"):
        ep_engine.generate(BATCH[:1], GREEDY)


def _placement(table: torch.Tensor, eplb) -> ExpertPlacement:
    return ExpertPlacement(table, eplb.placement.num_logical_experts, eplb.placement.num_ranks)


def _is_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as gone: it has exited and awaits its parent's wait)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
