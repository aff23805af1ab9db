"""The EPLB planner against hand-computed placements, and its invariants on random loads."""

from __future__ import annotations

import pytest
import torch

from triton_disagg.engine.eplb import (
    ExpertPlacement,
    SlotMove,
    decide_rebalance,
    initial_placement,
    pack,
    plan_weight_moves,
    rebalance_experts,
    replicate,
)


def placement(rows: list[list[int]], num_experts: int, num_ranks: int) -> ExpertPlacement:
    return ExpertPlacement(torch.tensor(rows), num_experts, num_ranks)


def assert_valid(plan: ExpertPlacement, num_slots: int) -> None:
    """Every expert has a replica, counts sum to the slots, no rank holds one expert twice."""
    plan.validate()
    counts = plan.replica_counts()
    assert (counts >= 1).all()
    assert (counts.sum(dim=1) == num_slots).all()
    per_rank = plan.physical_to_logical.view(plan.num_layers, plan.num_ranks, -1)
    for layer in per_rank.tolist():
        for rank in layer:
            assert len(set(rank)) == len(rank)


def test_replicate_gives_spare_slots_to_the_most_load_per_replica():
    # Loads 90, 40, 10...: 0 gets a 2nd (45 each), a 3rd (30, beats 1's 40? no: 45 > 40 first), then 1 (40 > 30),
    # then 0 again (30 > 20): counts 4, 2, 1...
    assert replicate([90, 40, 10, 10, 5, 5, 0, 0], num_slots=12, max_replicas=4) == [4, 2, 1, 1, 1, 1, 1, 1]
    # Capped at one replica per rank: 0 stops at 2, the rest go down the list.
    assert replicate([90, 40, 10, 10], num_slots=8, max_replicas=2) == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="cannot hold"):
        replicate([1, 1], num_slots=5, max_replicas=2)


def test_pack_puts_heaviest_first_on_the_least_loaded_rank():
    # 6 -> rank 0; 3 -> rank 1; 2 -> rank 1 (3 < 6); 1 -> rank 0 (rank 1 is full): loads 7 and 5.
    assert pack([6, 3, 2, 1], [1, 1, 1, 1], num_ranks=2) == [[0, 3], [1, 2]]


def test_pack_moves_a_replica_when_only_ranks_holding_the_expert_have_room():
    # Replica weights 10, 4, 3, 3, 0.5, 0.5 (expert 4 twice) on 2 ranks of 3 slots:
    # 10 -> r0; 4, 3, 3 -> r1 (full at 10); 0.5 -> r0; the second 0.5 only fits r0, which holds expert 4.
    # One of r1's replicas moves to r0: 3 (expert 2) keeps the larger rank lightest (13.5 against 14.5 for 4).
    assert pack([10, 4, 3, 3, 1], [1, 1, 1, 1, 2], num_ranks=2) == [[0, 2, 4], [1, 3, 4]]


def test_redundant_experts_balance_a_skewed_layer():
    load = torch.tensor([[90.0, 40, 10, 10, 5, 5, 0, 0]])
    without = rebalance_experts(load, num_slots=8, num_ranks=4)
    # One expert per rank... two per rank: 90 alone is the straggler; mean 40 / max 90.
    assert without.rank_loads(load).tolist() == [[90.0, 40.0, 15.0, 15.0]]
    assert without.balancedness(load).item() == pytest.approx(40 / 90)
    with_four = rebalance_experts(load, num_slots=12, num_ranks=4)
    # Counts 4, 2, 1...: each rank has a 22.5 replica of 0; 1's two replicas (20) and the 10s, 5s, 0s fill in.
    assert with_four.rank_loads(load).tolist() == [[42.5, 42.5, 37.5, 37.5]]
    assert with_four.balancedness(load).item() == pytest.approx(40 / 42.5)
    assert_valid(with_four, 12)


def test_hierarchical_plan_keeps_each_group_on_one_node():
    # Groups of two: loads 15, 2, 11, 2. Nodes get g0 (15) and g2 (11), then g1 (2) goes to the lighter
    # node 1 and g3 to node 0 (node 1 is full). Node 0 = experts 0, 1, 6, 7 on ranks 0-1: 8 -> r0,
    # 7 -> r1, 1 (e6) -> r1, 1 (e7) -> r0. Node 1 = 2, 3, 4, 5 on ranks 2-3: 6 -> r2, 5 -> r3, e2 -> r3, e3 -> r2.
    load = torch.tensor([[8.0, 7, 1, 1, 6, 5, 1, 1]])
    plan = rebalance_experts(load, num_slots=8, num_ranks=4, num_nodes=2, num_groups=4)
    assert plan.physical_to_logical.tolist() == [[0, 7, 1, 6, 3, 4, 2, 5]]


def test_logical_to_physical_lists_each_experts_slots():
    plan = placement([[0, 1, 2, 0, 1, 3]], num_experts=4, num_ranks=2)
    assert plan.replica_counts().tolist() == [[2, 2, 1, 1]]
    assert plan.logical_to_physical().tolist() == [[[0, 3], [1, 4], [2, -1], [5, -1]]]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("num_experts", "num_slots", "num_ranks", "num_nodes", "num_groups"), [
    (8, 8, 4, 1, 1), (8, 12, 4, 1, 1), (16, 20, 4, 1, 1), (16, 32, 8, 1, 1), (16, 24, 4, 2, 4), (6, 8, 4, 1, 1),
])
def test_plans_keep_their_invariants_on_random_skewed_loads(seed, num_experts, num_slots, num_ranks, num_nodes, num_groups):
    generator = torch.Generator().manual_seed(seed)
    load = (torch.rand(3, num_experts, generator=generator) ** 4) * 1000  # a few hot experts per layer
    plan = rebalance_experts(load, num_slots, num_ranks, num_nodes, num_groups)
    assert_valid(plan, num_slots)
    # Splitting an expert's load over its replicas loses and invents none.
    assert (plan.rank_loads(load).sum(dim=1) - load.double().sum(dim=1)).abs().max() < 1e-6


def test_replanning_the_same_load_moves_nothing():
    load = torch.tensor([[50.0, 10, 30, 5, 1, 1, 1, 1], [1.0, 1, 1, 1, 40, 40, 2, 2]])
    first = rebalance_experts(load, 12, 4)
    # Renumbered ranks and slots would be just as balanced; aligning to `previous` keeps everything where it is.
    assert torch.equal(rebalance_experts(load, 12, 4, previous=first).physical_to_logical, first.physical_to_logical)


def test_weight_moves_prefer_a_copy_on_the_same_rank():
    # 2 slots per rank. Slot 1 (rank 0) needs expert 0, which rank 0 holds in slot 0: a local copy.
    # Slot 3 (rank 1) needs expert 2, held by slot 2... which is being overwritten: still read first.
    old = [0, 1, 2, 3]
    new = [0, 0, 3, 2]
    assert plan_weight_moves(old, new, 2) == [SlotMove(0, 1, 0), SlotMove(3, 2, 3), SlotMove(2, 3, 2)]
    # Expert 1 must come from another rank: ranks 0 and 1 both hold it; the first send goes to rank 0,
    # the second to rank 1 (fewest sends so far).
    old = [1, 2, 1, 3, 4, 5]
    assert plan_weight_moves(old, [1, 2, 1, 3, 1, 1], 2) == [SlotMove(0, 4, 1), SlotMove(2, 5, 1)]


def test_decisions_say_why():
    skewed = torch.tensor([[90.0, 40, 10, 10, 5, 5, 0, 0]])
    current = initial_placement(1, 8, 12, 4)
    assert decide_rebalance(torch.zeros(1, 8, dtype=torch.int64), current, 0.9).reason == "insufficient_data"
    assert decide_rebalance(torch.ones(1, 8), current, 0.9).reason == "balanced"
    decision = decide_rebalance(skewed, current, 0.9)
    assert decision.reason == "rebalance" and decision.should_move
    assert decision.balancedness < 0.9 <= decision.planned_balancedness
    assert decision.changed_layers == (0,)
    # Once moved, the same load is as good as the planner gets: a threshold of 1.0 finds no gain.
    assert decide_rebalance(skewed, decision.placement, 1.0).reason == "no_gain"


def test_invalid_placements_are_named():
    with pytest.raises(ValueError, match="expert 3 has no replica"):
        placement([[0, 1, 2, 0]], 4, 2).validate()
    with pytest.raises(ValueError, match="two replicas of one expert"):
        placement([[0, 0, 1, 2]], 3, 2).validate()
    with pytest.raises(ValueError, match="do not split evenly"):
        rebalance_experts(torch.ones(1, 4), num_slots=5, num_ranks=2)
