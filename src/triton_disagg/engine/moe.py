"""Expert-parallel MoE layers: routing to physical slots, a rank's slot weights, and the rank-0 layer.

The router picks top-k *logical* experts per token as in Mixtral. With
expert parallelism each logical expert lives in one or more *physical slots*
spread over ranks (`eplb.ExpertPlacement`); `assign_slots` sends the j-th
token routed to an expert to replica `j mod replicas`, so replicas share its
load evenly. Every rank runs its own slots on the tokens routed to them
(`ExpertSlots`) and the partial outputs are summed (`ExpertExchange`).

Each slot computes what `MixtralExpert` computes on the same rows, and a
token's partial outputs hold only its own experts' terms, so with top-2
routing and one replica per expert the sum is bit-identical to the single-rank
layer. With replicas an expert's rows are split over them, and a matmul over
fewer rows may round differently in the last bits; greedy tokens stay the same
in the tests.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


def route_tokens(router_logits: torch.Tensor, top_k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: softmax over all experts, top-k, weights renormalised over the k.

    `router_logits` (T, E). Returns weights (T, K) in `dtype` and logical expert ids (T, K) int64.
    """
    router_probs = F.softmax(router_logits.float(), dim=-1)
    top_weights, top_experts = torch.topk(router_probs, top_k, dim=-1)
    return (top_weights / top_weights.sum(dim=-1, keepdim=True)).to(dtype), top_experts


def assign_slots(
    top_experts: torch.Tensor,  # (T, K) logical expert ids
    logical_to_physical: torch.Tensor,  # (E, R) slots of each expert, padded
    replica_counts: torch.Tensor,  # (E,) int64
    expert_counts: torch.Tensor,  # (E,) int64: bincount of top_experts
) -> torch.Tensor:  # (T, K) physical slot ids
    """The physical slot of each routed token: the j-th token (in token, then k order) routed to an
    expert goes to that expert's replica `j mod replica_counts[expert]`."""
    flat = top_experts.flatten()
    order = torch.argsort(flat, stable=True)
    starts = torch.cumsum(expert_counts, 0) - expert_counts
    nth = torch.empty_like(flat)
    nth[order] = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    return logical_to_physical[flat, nth % replica_counts[flat]].view_as(top_experts)


class ExpertSlots(nn.Module):
    """One rank's physical slots of one MoE layer: stacked SwiGLU weights, Mixtral names (w1 gate, w3 up, w2 down).

    Slot `i` here is global slot `first_slot + i`. Counts the tokens each slot ran
    and the CPU seconds spent (for per-rank load reports).
    """

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, first_slot: int):
        super().__init__()
        self.register_buffer("w1", w1)  # (S, I, H)
        self.register_buffer("w2", w2)  # (S, H, I)
        self.register_buffer("w3", w3)  # (S, I, H)
        self.first_slot = first_slot
        self.register_buffer("slot_tokens", torch.zeros(w1.shape[0], dtype=torch.int64, device=w1.device))
        self.compute_s = 0.0

    @classmethod
    def stack(cls, experts: list[dict[str, torch.Tensor]], first_slot: int) -> "ExpertSlots":
        """From one `{"w1", "w2", "w3"}` weight dict per slot, in slot order."""
        return cls(*(torch.stack([weights[name] for weights in experts]) for name in ("w1", "w2", "w3")), first_slot)

    @property
    def num_slots(self) -> int:
        return self.w1.shape[0]

    @property
    def packed_numel(self) -> int:
        """Elements of one slot's `packed` weights."""
        return self.w1[0].numel() + self.w2[0].numel() + self.w3[0].numel()

    def forward(
        self,
        x: torch.Tensor,  # (T, H)
        slots: torch.Tensor,  # (T, K) global physical slot ids
        weights: torch.Tensor,  # (T, K) routing weights, x's dtype
    ) -> torch.Tensor:  # (T, H): this rank's experts' terms; zero rows for tokens it does not serve
        started_s = time.thread_time()
        local = slots - self.first_slot
        out = torch.zeros_like(x)
        is_local = (local >= 0) & (local < self.num_slots)
        counts = torch.bincount(local[is_local], minlength=self.num_slots)
        self.slot_tokens += counts
        for slot in counts.nonzero().flatten().tolist():
            token_idx, k_idx = torch.where(local == slot)
            rows = x[token_idx]
            hidden = F.silu(F.linear(rows, self.w1[slot])) * F.linear(rows, self.w3[slot])
            out.index_add_(0, token_idx, F.linear(hidden, self.w2[slot]) * weights[token_idx, k_idx, None])
        self.compute_s += time.thread_time() - started_s
        return out

    def packed(self, slot: int) -> torch.Tensor:  # (3 * I * H,)
        """Slot `slot`'s weights as one flat tensor (to send to another rank)."""
        return torch.cat([self.w1[slot].flatten(), self.w3[slot].flatten(), self.w2[slot].flatten()])

    def unpack_into(self, slot: int, flat: torch.Tensor) -> None:
        """Overwrite slot `slot` with weights from `packed`."""
        w1, w3, w2 = flat.split([self.w1[slot].numel(), self.w3[slot].numel(), self.w2[slot].numel()])
        self.w1[slot].copy_(w1.view_as(self.w1[slot]))
        self.w3[slot].copy_(w3.view_as(self.w3[slot]))
        self.w2[slot].copy_(w2.view_as(self.w2[slot]))


class ExpertExchange(Protocol):
    """Runs a layer's routed tokens on every rank's slots and sums the partial outputs.

    `combine` returns `(T, H)` in x's dtype; inputs are not mutated. Raises
    RuntimeError when a rank is gone.
    """

    def combine(self, layer: int, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


class ExpertParallelMoe(nn.Module):
    """Rank 0's MoE layer: the router, then the exchange over every rank's slots.

    Keeps `expert_token_counts` (cumulative tokens per logical expert) like
    `SparseMoeBlock`. `set_placement` switches the routing tables, between steps,
    once the slots' weights match them.
    """

    def __init__(self, gate: nn.Linear, layer_idx: int, top_k: int, exchange: ExpertExchange, placement_row: torch.Tensor):
        super().__init__()
        self.gate = gate
        self.layer_idx = layer_idx
        self.top_k = top_k
        self.num_experts = gate.out_features
        self.exchange = exchange
        device = gate.weight.device
        self.register_buffer("expert_token_counts", torch.zeros(self.num_experts, dtype=torch.int64, device=device))
        self.register_buffer("logical_to_physical", torch.zeros(self.num_experts, 1, dtype=torch.int64, device=device))
        self.register_buffer("replica_counts", torch.ones(self.num_experts, dtype=torch.int64, device=device))
        self.set_placement(placement_row)

    def set_placement(self, row: torch.Tensor) -> None:
        """Route by `row` (S,): the logical expert each physical slot holds."""
        row = row.cpu()
        counts = torch.bincount(row, minlength=self.num_experts)
        table = torch.full((self.num_experts, int(counts.max())), -1, dtype=torch.int64)
        filled = [0] * self.num_experts
        for slot, expert in enumerate(row.tolist()):
            table[expert, filled[expert]] = slot
            filled[expert] += 1
        device = self.expert_token_counts.device
        self.logical_to_physical = table.to(device)
        self.replica_counts = counts.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, hidden)
        top_weights, top_experts = route_tokens(self.gate(x), self.top_k, x.dtype)
        counts = torch.bincount(top_experts.flatten(), minlength=self.num_experts)
        self.expert_token_counts += counts
        slots = assign_slots(top_experts, self.logical_to_physical, self.replica_counts, counts)
        return self.exchange.combine(self.layer_idx, x, slots, top_weights)


class LocalExchange:
    """Every rank's slots in this one process: the same slot tables and sums, without processes (for tests)."""

    def __init__(self, slots_by_layer: list[list[ExpertSlots]]):
        """`slots_by_layer[layer][rank]`."""
        self.slots_by_layer = slots_by_layer

    def combine(self, layer: int, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ranks = self.slots_by_layer[layer]
        out = ranks[0](x, slots, weights)
        for rank_slots in ranks[1:]:
            out += rank_slots(x, slots, weights)
        return out
