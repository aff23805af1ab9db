"""Expert-parallel load balancing (EPLB): which logical expert each physical slot holds, from expert loads.

An MoE layer of `E` logical experts is served from `S >= E` physical slots,
`S / num_ranks` on each expert-parallel rank; the `S - E` redundant slots hold
extra replicas of hot experts, and a token routed to an expert with several
replicas goes to one of them, so each replica carries `load / replicas`.

The planner (`rebalance_experts`) follows DeepSeek's EPLB: give the slots
to experts greedily by load per replica, then pack the replicas onto ranks,
heaviest first, each onto the least loaded rank that has room. Unlike the
reference it never puts two replicas of one expert on one rank (a second copy
on the same rank splits nothing). With `num_nodes > 1` it is hierarchical:
expert groups are first packed onto nodes, then each node replicates and packs
its own experts onto its ranks, so a token never leaves the node of its group.

Everything here is pure: CPU tensors and lists in, placements and decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class ExpertPlacement:
    """Which logical expert every physical slot of every MoE layer holds.

    Slot `s` lives on rank `s // slots_per_rank`. Invariants (`validate`):
    every logical expert has at least one replica per layer, and no rank
    holds two replicas of one expert.
    """

    physical_to_logical: torch.Tensor  # (L, S) int64
    num_logical_experts: int
    num_ranks: int

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    def replica_counts(self) -> torch.Tensor:  # (L, E) int64
        counts = torch.zeros(self.num_layers, self.num_logical_experts, dtype=torch.int64)
        return counts.scatter_add_(1, self.physical_to_logical, torch.ones_like(self.physical_to_logical))

    def logical_to_physical(self) -> torch.Tensor:  # (L, E, max replicas) int64
        """Slots of each expert in ascending order; rows shorter than the widest are padded with -1."""
        counts = self.replica_counts()
        width = int(counts.max())
        table = torch.full((self.num_layers, self.num_logical_experts, width), -1, dtype=torch.int64)
        for layer in range(self.num_layers):
            filled = [0] * self.num_logical_experts
            for slot, expert in enumerate(self.physical_to_logical[layer].tolist()):
                table[layer, expert, filled[expert]] = slot
                filled[expert] += 1
        return table

    def rank_loads(self, load: torch.Tensor) -> torch.Tensor:  # (L, E) -> (L, num_ranks) float64
        """Expected tokens per rank when each expert's `load` is split evenly over its replicas."""
        per_replica = load.double() / self.replica_counts().clamp(min=1)
        slot_loads = per_replica.gather(1, self.physical_to_logical)  # (L, S)
        return slot_loads.view(self.num_layers, self.num_ranks, self.slots_per_rank).sum(dim=2)

    def balancedness(self, load: torch.Tensor) -> torch.Tensor:  # (L, E) -> (L,) float64
        """Mean rank load over max rank load per layer (1.0: perfectly even; a layer with no load counts 1.0)."""
        return balancedness(self.rank_loads(load))

    def with_layer(self, layer: int, row: torch.Tensor) -> "ExpertPlacement":
        """A copy with layer `layer`'s slots replaced by `row` (S,)."""
        table = self.physical_to_logical.clone()
        table[layer] = row
        return ExpertPlacement(table, self.num_logical_experts, self.num_ranks)

    def validate(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        if self.num_slots % self.num_ranks:
            raise ValueError(f"{self.num_slots} slots do not split evenly over {self.num_ranks} ranks")
        table = self.physical_to_logical
        if table.numel() and not (0 <= int(table.min()) and int(table.max()) < self.num_logical_experts):
            raise ValueError(f"slot holds an expert outside [0, {self.num_logical_experts})")
        counts = self.replica_counts()
        if (counts == 0).any():
            layer, expert = (counts == 0).nonzero()[0].tolist()
            raise ValueError(f"layer {layer}: logical expert {expert} has no replica")
        per_rank = table.view(self.num_layers, self.num_ranks, self.slots_per_rank)
        for layer in range(self.num_layers):
            for rank in range(self.num_ranks):
                experts = per_rank[layer, rank].tolist()
                if len(set(experts)) != len(experts):
                    raise ValueError(f"layer {layer}: rank {rank} holds two replicas of one expert: {experts}")


def balancedness(rank_loads: torch.Tensor) -> torch.Tensor:  # (..., num_ranks) -> (...)
    """Mean over max of the last dimension; 1.0 where the max is 0."""
    rank_loads = rank_loads.double()
    peak = rank_loads.max(dim=-1).values
    return torch.where(peak > 0, rank_loads.mean(dim=-1) / peak.clamp(min=1e-30), torch.ones_like(peak))


def replicate(load: list[float], num_slots: int, max_replicas: int) -> list[int]:
    """Replicas per expert: one each, then every spare slot to the expert with the most load per replica.

    Ties go to the lower expert id. Raises ValueError when the slots cannot be filled
    within `max_replicas` per expert, or are fewer than the experts.
    """
    num_experts = len(load)
    if not num_experts <= num_slots <= num_experts * max_replicas:
        raise ValueError(
            f"{num_slots} slots cannot hold {num_experts} experts with 1..{max_replicas} replicas each"
        )
    counts = [1] * num_experts
    for _ in range(num_slots - num_experts):
        best = max((e for e in range(num_experts) if counts[e] < max_replicas), key=lambda e: (load[e] / counts[e], -e))
        counts[best] += 1
    return counts


def pack(load: list[float], counts: list[int], num_ranks: int) -> list[list[int]]:
    """Replicas onto ranks, heaviest first, each to the least loaded rank with room and without that expert.

    `load[e] / counts[e]` is one replica's weight. Returns each rank's experts (sorted);
    every rank gets `sum(counts) / num_ranks` of them. When every rank with room
    already holds the expert, a replica of another expert is moved out of a full rank
    to make room (always possible while `counts[e] <= num_ranks`).
    """
    num_slots = sum(counts)
    if num_slots % num_ranks or max(counts) > num_ranks:
        raise ValueError(f"cannot pack replica counts {counts} onto {num_ranks} ranks evenly and distinctly")
    capacity = num_slots // num_ranks
    items = sorted(
        ((load[e] / counts[e], e) for e in range(len(counts)) for _ in range(counts[e])), key=lambda it: (-it[0], it[1])
    )
    held: list[list[int]] = [[] for _ in range(num_ranks)]
    rank_load = [0.0] * num_ranks
    weight = {e: load[e] / counts[e] for e in range(len(counts))}
    for w, expert in items:
        open_ranks = [r for r in range(num_ranks) if len(held[r]) < capacity and expert not in held[r]]
        if open_ranks:
            rank = min(open_ranks, key=lambda r: (rank_load[r], r))
        else:
            rank = _make_room(held, rank_load, weight, expert, capacity)
        held[rank].append(expert)
        rank_load[rank] += w
    return [sorted(experts) for experts in held]


def _make_room(held: list[list[int]], rank_load: list[float], weight: dict[int, float], expert: int, capacity: int) -> int:
    """Move one replica from a full rank lacking `expert` to a rank with room (which holds `expert`).

    Returns the full rank, which now has room for `expert`. Picks the move that keeps
    the larger of the two rank loads smallest.
    """
    roomy = min((r for r in range(len(held)) if len(held[r]) < capacity), key=lambda r: (rank_load[r], r))
    best = None
    for rank in range(len(held)):
        if expert in held[rank]:
            continue
        for other in held[rank]:
            if other in held[roomy]:
                continue
            peak = max(rank_load[roomy] + weight[other], rank_load[rank] - weight[other] + weight[expert])
            if best is None or peak < best[0]:
                best = (peak, rank, other)
    if best is None:
        raise AssertionError(f"no replica can make room for expert {expert}: ranks hold {held}")
    _, rank, other = best
    held[rank].remove(other)
    rank_load[rank] -= weight[other]
    held[roomy].append(other)
    rank_load[roomy] += weight[other]
    return rank


def pack_groups(load: list[float], num_packs: int) -> list[list[int]]:
    """Items onto packs of equal count (`len(load) / num_packs`), heaviest first onto the lightest pack with room."""
    capacity = len(load) // num_packs
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    pack_load = [0.0] * num_packs
    for item in sorted(range(len(load)), key=lambda i: (-load[i], i)):
        target = min((p for p in range(num_packs) if len(packs[p]) < capacity), key=lambda p: (pack_load[p], p))
        packs[target].append(item)
        pack_load[target] += load[item]
    return packs


def _plan_layer(load: list[float], num_slots: int, num_ranks: int, num_nodes: int, num_groups: int) -> list[list[int]]:
    """Each rank's logical experts for one layer."""
    num_experts = len(load)
    if num_nodes == 1 or num_groups % num_nodes:
        return pack(load, replicate(load, num_slots, num_ranks), num_ranks)
    group_size = num_experts // num_groups
    group_load = [sum(load[g * group_size : (g + 1) * group_size]) for g in range(num_groups)]
    ranks_per_node = num_ranks // num_nodes
    held: list[list[int]] = []
    for groups in pack_groups(group_load, num_nodes):
        experts = [g * group_size + i for g in sorted(groups) for i in range(group_size)]
        node_load = [load[e] for e in experts]
        counts = replicate(node_load, num_slots // num_nodes, ranks_per_node)
        held += [sorted(experts[i] for i in rank) for rank in pack(node_load, counts, ranks_per_node)]
    return held


def rebalance_experts(
    load: torch.Tensor,  # (L, E) tokens per logical expert
    num_slots: int,
    num_ranks: int,
    num_nodes: int = 1,
    num_groups: int = 1,
    previous: ExpertPlacement | None = None,
) -> ExpertPlacement:
    """A placement of `num_slots` slots per layer over `num_ranks` ranks that balances `load`.

    `num_groups` splits the experts into contiguous groups (DeepSeek's group-limited
    routing); with `num_nodes > 1` and groups divisible by nodes, groups are packed onto
    nodes first (ranks `n * num_ranks / num_nodes ...` form node `n`), else the plan is
    global. With `previous`, ranks and slots are renumbered (within each node) so
    that as many slots as possible keep the expert they hold, which keeps weight
    moves few. Raises ValueError for shapes that cannot be placed.
    """
    num_layers, num_experts = load.shape
    _check_shape(num_experts, num_slots, num_ranks, num_nodes, num_groups)
    rows = []
    for layer in range(num_layers):
        held = _plan_layer(load[layer].double().tolist(), num_slots, num_ranks, num_nodes, num_groups)
        if previous is not None:
            old = previous.physical_to_logical[layer].view(num_ranks, -1).tolist()
            held = _align(held, old, num_ranks // num_nodes if num_groups % num_nodes == 0 else num_ranks)
        rows.append([expert for rank in held for expert in rank])
    placement = ExpertPlacement(torch.tensor(rows, dtype=torch.int64), num_experts, num_ranks)
    placement.validate()
    return placement


def initial_placement(num_layers: int, num_experts: int, num_slots: int, num_ranks: int) -> ExpertPlacement:
    """The plan for an even load: what a server starts with before any expert load is known."""
    return rebalance_experts(torch.ones(num_layers, num_experts), num_slots, num_ranks)


def _check_shape(num_experts: int, num_slots: int, num_ranks: int, num_nodes: int, num_groups: int) -> None:
    if num_ranks < 1 or num_slots % num_ranks:
        raise ValueError(f"{num_slots} slots do not split evenly over {num_ranks} ranks")
    if not num_experts <= num_slots <= num_experts * num_ranks:
        raise ValueError(
            f"{num_slots} slots for {num_experts} experts on {num_ranks} ranks: need between {num_experts} "
            f"(one replica each) and {num_experts * num_ranks} (a replica on every rank)"
        )
    if num_nodes < 1 or num_ranks % num_nodes or num_slots % num_nodes:
        raise ValueError(f"{num_ranks} ranks and {num_slots} slots do not split evenly over {num_nodes} nodes")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(f"{num_experts} experts do not split into {num_groups} equal groups")
    if num_nodes > 1 and num_groups % num_nodes == 0:
        per_node = num_experts // num_nodes
        if num_slots // num_nodes > per_node * (num_ranks // num_nodes):
            raise ValueError(f"a node's {num_slots // num_nodes} slots exceed a replica of each of its experts per rank")


def _align(held: list[list[int]], old: list[list[int]], ranks_per_block: int) -> list[list[int]]:
    """Renumber ranks (within blocks of `ranks_per_block`) and order slots to keep old slot contents.

    `held`: each new rank's experts; `old`: each rank's slots before. Greedy: the
    new rank sharing most experts with an old rank takes that rank's place; an
    expert that stays on its rank keeps its slot.
    """
    num_ranks = len(held)
    placed: list[list[int] | None] = [None] * num_ranks
    for start in range(0, num_ranks, ranks_per_block):
        block = range(start, start + ranks_per_block)
        pairs = sorted(
            ((len(set(held[n]) & set(old[o])), n, o) for n in block for o in block), key=lambda p: (-p[0], p[1], p[2])
        )
        taken_new, taken_old = set(), set()
        for _, new_rank, old_rank in pairs:
            if new_rank in taken_new or old_rank in taken_old:
                continue
            taken_new.add(new_rank)
            taken_old.add(old_rank)
            placed[old_rank] = _keep_slots(held[new_rank], old[old_rank])
    return placed  # type: ignore[return-value]


def _keep_slots(experts: list[int], old_slots: list[int]) -> list[int]:
    """Slot order for `experts` on a rank that held `old_slots`: staying experts keep their slot."""
    staying = set(experts) & set(old_slots)
    arriving = iter(sorted(set(experts) - staying))
    return [expert if expert in staying else next(arriving) for expert in old_slots]


@dataclass(slots=True, frozen=True)
class SlotMove:
    """Copy the weights of physical slot `src_slot` (before the move) into `dst_slot`."""

    src_slot: int
    dst_slot: int
    logical_expert: int


def plan_weight_moves(old_row: list[int], new_row: list[int], slots_per_rank: int) -> list[SlotMove]:
    """The copies that turn one layer's slots from `old_row` into `new_row` (logical expert per slot).

    Every slot whose expert changes is filled from a slot that held that expert
    before: on the same rank when there is one (a local copy), else on the rank
    with the fewest sends so far. Sources are read before any slot is overwritten.
    """
    sources: dict[int, list[int]] = {}
    for slot, expert in enumerate(old_row):
        sources.setdefault(expert, []).append(slot)
    sends = [0] * (len(old_row) // slots_per_rank)
    moves = []
    for dst, expert in enumerate(new_row):
        if old_row[dst] == expert:
            continue
        if expert not in sources:
            raise ValueError(f"no slot holds expert {expert} before the move")
        rank = dst // slots_per_rank
        local = [s for s in sources[expert] if s // slots_per_rank == rank]
        src = local[0] if local else min(sources[expert], key=lambda s: (sends[s // slots_per_rank], s))
        if not local:
            sends[src // slots_per_rank] += 1
        moves.append(SlotMove(src, dst, expert))
    return moves


@dataclass(slots=True, frozen=True)
class RebalanceDecision:
    """What the live balancer should do with a window of loads, and why.

    `reason`: "rebalance" (move to `placement`), "balanced" (at or above the
    threshold), "no_gain" (the plan is not better by `min_gain`), or
    "insufficient_data" (the window saw no tokens).
    """

    reason: str
    balancedness: float
    planned_balancedness: float | None = None
    placement: ExpertPlacement | None = None
    changed_layers: tuple[int, ...] = ()

    @property
    def should_move(self) -> bool:
        return self.reason == "rebalance"


def decide_rebalance(
    window_load: torch.Tensor,  # (L, E)
    current: ExpertPlacement,
    threshold: float,
    min_gain: float = 0.01,
    num_nodes: int = 1,
    num_groups: int = 1,
) -> RebalanceDecision:
    """Whether to move to a new placement: when mean balancedness under `current` is below `threshold`
    and the plan for `window_load` raises it by at least `min_gain`."""
    if int(window_load.sum()) == 0:
        return RebalanceDecision("insufficient_data", 1.0)
    now = float(current.balancedness(window_load).mean())
    if now >= threshold:
        return RebalanceDecision("balanced", now)
    plan = rebalance_experts(window_load, current.num_slots, current.num_ranks, num_nodes, num_groups, previous=current)
    planned = float(plan.balancedness(window_load).mean())
    if planned < now + min_gain:
        return RebalanceDecision("no_gain", now, planned)
    changed = tuple(
        layer for layer in range(current.num_layers)
        if not torch.equal(plan.physical_to_logical[layer], current.physical_to_logical[layer])
    )
    return RebalanceDecision("rebalance", now, planned, plan, changed)
