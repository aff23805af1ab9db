"""Rank 0's MoE bookkeeping: the expert load window, the expert-parallel group, live rebalancing.

Every step records the router's choices into the load window. With
`eplb_interval > 0`, every that many steps the window is checked
(`eplb.decide_rebalance`); a new placement is then applied one layer per step
boundary (`before_step`), so a step stalls for one layer's weight move at
most and requests in flight keep generating. A layer's routing switches to the
new slots only once its weights have moved, so every token is computed by the
same expert weights as without the move.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from triton_disagg.engine.config import EngineConfig, ModelConfig
from triton_disagg.engine.eplb import ExpertPlacement, RebalanceDecision, decide_rebalance, initial_placement
from triton_disagg.engine.expert_load import ExpertLoadWindow
from triton_disagg.engine.expert_parallel import ExpertParallelGroup, RankReport

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class EplbStats:
    """Rebalancing so far, for metrics."""

    #: Placements applied in full (every changed layer moved).
    num_rearrangements: int = 0
    #: Seconds steps stalled on weight moves, in total.
    rearrangement_s: float = 0.0
    #: The longest single stall: one layer's move between two steps.
    max_stall_s: float = 0.0
    #: Physical slots whose expert changed, in total.
    num_moved_slots: int = 0
    #: The reason of the last check ("rebalance", "balanced", "no_gain", "insufficient_data"); "" before any.
    last_decision: str = ""


@dataclass(slots=True, frozen=True)
class ExpertLoadSnapshot:
    """Expert loads and placement at one moment, as plain lists (for metrics and the JSON dump)."""

    num_layers: int
    num_experts: int
    top_k: int
    ep_size: int
    num_slots: int
    window_steps: int
    num_window_steps: int
    num_steps: int
    window_load: list[list[int]]  # (L, E) tokens per logical expert over the window
    total_load: list[list[int]]  # (L, E) since start
    physical_to_logical: list[list[int]]  # (L, S)
    balancedness: list[float]  # (L,) mean / max rank load over the window, current placement
    stats: EplbStats = field(default_factory=EplbStats)

    def to_json(self) -> dict:
        return asdict(self)

    def total_tokens_by_label(self, max_series: int) -> dict[tuple[str, str], int]:
        """Total tokens by (layer, expert) label values; per expert summed over layers (`layer="all"`)
        when there would be more than `max_series` pairs."""
        totals = self.total_load
        if self.num_layers * self.num_experts <= max_series:
            return {(str(layer), str(e)): row[e] for layer, row in enumerate(totals) for e in range(len(row))}
        return {("all", str(e)): sum(row[e] for row in totals) for e in range(self.num_experts)}


class EplbState:
    """Expert load statistics of an MoE model, and, with `ep_size > 1`, its expert-parallel group.

    Construct after the model is loaded and the settings passed
    `validate_expert_parallel`; with `ep_size > 1` it starts ranks 1..N-1 and
    shards the model's MoE layers. Engine-thread only.
    """

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, config: EngineConfig, device: torch.device,
                 dtype: torch.dtype):
        self.model = model
        self.config = config
        self.top_k = model_config.num_experts_per_tok
        num_layers, num_experts = model_config.num_hidden_layers, model_config.num_experts
        self.window = ExpertLoadWindow(num_layers, num_experts, config.eplb_window, device)
        num_slots = num_experts + config.eplb_redundant_experts
        self.placement = initial_placement(num_layers, num_experts, num_slots, config.ep_size)
        self.stats = EplbStats()
        self.group: ExpertParallelGroup | None = None
        self._target: ExpertPlacement | None = None
        self._pending_layers: list[int] = []
        self._steps_since_check = 0
        if config.ep_size > 1:
            self.group = ExpertParallelGroup(config.model_path, self.placement, device, dtype)
            self.group.start(model)

    @property
    def is_moving(self) -> bool:
        """Whether a rearrangement is under way (some layers moved, some not yet)."""
        return bool(self._pending_layers)

    def before_step(self) -> None:
        """Between steps: move the next pending layer's weights, if a rearrangement is under way."""
        if not self._pending_layers:
            return
        layer = self._pending_layers.pop(0)
        started_s = time.perf_counter()
        moe = self.model.model.layers[layer].block_sparse_moe
        self.stats.num_moved_slots += self.group.move_layer(layer, self._target.physical_to_logical[layer], moe)
        stall_s = time.perf_counter() - started_s
        self.placement = self.group.placement
        self.stats.rearrangement_s += stall_s
        self.stats.max_stall_s = max(self.stats.max_stall_s, stall_s)
        if not self._pending_layers:
            self.stats.num_rearrangements += 1
            self._target = None

    def after_step(self) -> None:
        """After a step's forward pass: record its expert load; every `eplb_interval` steps, check the balance."""
        self.window.record(self.model.expert_token_counts())
        self._steps_since_check += 1
        interval = self.config.eplb_interval
        if self.group is None or self._pending_layers or interval == 0 or self._steps_since_check < interval:
            return
        self._steps_since_check = 0
        self.apply(decide_rebalance(self.window.window_load(), self.placement, self.config.eplb_threshold))

    def apply(self, decision: RebalanceDecision) -> None:
        """Start moving to `decision.placement` (layer by layer, from the next step boundary)."""
        self.stats.last_decision = decision.reason
        if not decision.should_move:
            return
        logger.info(
            "rebalancing experts of %d layers: balancedness %.3f -> %.3f planned",
            len(decision.changed_layers), decision.balancedness, decision.planned_balancedness,
        )
        self._target = decision.placement
        self._pending_layers = list(decision.changed_layers)

    def snapshot(self) -> ExpertLoadSnapshot:
        """The current loads, placement and stats as plain values (syncs with the device)."""
        window = self.window.window_load()
        return ExpertLoadSnapshot(
            num_layers=self.placement.num_layers,
            num_experts=self.placement.num_logical_experts,
            top_k=self.top_k,
            ep_size=self.placement.num_ranks,
            num_slots=self.placement.num_slots,
            window_steps=self.window.window_steps,
            num_window_steps=self.window.num_window_steps,
            num_steps=self.window.num_steps,
            window_load=window.tolist(),
            total_load=self.window.total_load().tolist(),
            physical_to_logical=self.placement.physical_to_logical.tolist(),
            balancedness=self.placement.balancedness(window).tolist(),
            stats=EplbStats(**asdict(self.stats)),
        )

    def rank_reports(self) -> list[RankReport]:
        """Per-rank slot loads and CPU time (expert parallel only; empty otherwise)."""
        return [] if self.group is None else self.group.reports()

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


def validate_expert_parallel(config: EngineConfig, model_config: ModelConfig) -> None:
    """Raise ValueError naming the setting when the expert-parallel settings cannot serve this model
    (the model-independent ranges are `EngineConfig.validate`'s)."""
    if config.ep_size > 1 and not model_config.is_moe:
        raise ValueError(f"ep_size {config.ep_size} needs an MoE checkpoint; {config.model_path} is a dense {model_config.model_type}")
    if not model_config.is_moe:
        return
    num_experts, ep_size = model_config.num_experts, config.ep_size
    num_slots = num_experts + config.eplb_redundant_experts
    if num_slots % ep_size:
        raise ValueError(
            f"{num_experts} experts + eplb_redundant_experts {config.eplb_redundant_experts} = {num_slots} slots "
            f"do not split evenly over ep_size {ep_size}; make the sum a multiple of {ep_size}"
        )
    if num_slots < ep_size or num_slots > num_experts * ep_size:
        raise ValueError(
            f"eplb_redundant_experts {config.eplb_redundant_experts} with ep_size {ep_size}: every rank needs a slot "
            f"and no expert can have more than {ep_size} replicas; use at most {num_experts * (ep_size - 1)}"
        )
