"""Expert load statistics: tokens routed to each logical expert, per MoE layer, over a window of steps.

Each MoE layer counts its router's top-k choices into a cumulative
`expert_token_counts` buffer (one `bincount` a step, on the model's device).
`ExpertLoadWindow` turns those into per-step rows of a ring buffer, so the
last `window_steps` steps and the total since start can be read at any time
without a host sync on the step itself.
"""

from __future__ import annotations

import torch


class ExpertLoadWindow:
    """A sliding window of per-step expert loads `(L, E)`, and their total since start.

    `record` runs on the engine thread after each step and stays on the device;
    `window_load` and `total_load` copy to the host (read them off the hot path).
    """

    def __init__(self, num_layers: int, num_experts: int, window_steps: int, device: torch.device | str = "cpu"):
        if window_steps < 1:
            raise ValueError(f"eplb_window must be >= 1 step, got {window_steps}")
        self.window_steps = window_steps
        self._ring = torch.zeros(window_steps, num_layers, num_experts, dtype=torch.int64, device=device)
        self._total = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self._window_sum = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
        self._last_cumulative: torch.Tensor | None = None
        self.num_steps = 0

    def record(self, cumulative_counts: torch.Tensor) -> None:
        """Take the model's cumulative counts `(L, E)`; the increase since the last call is one step's load."""
        step = cumulative_counts if self._last_cumulative is None else cumulative_counts - self._last_cumulative
        self._last_cumulative = cumulative_counts.clone()
        slot = self.num_steps % self.window_steps
        self._window_sum += step - self._ring[slot]  # the step leaving the window goes out of the sum
        self._ring[slot] = step
        self._total += step
        self.num_steps += 1

    def window_load(self) -> torch.Tensor:  # (L, E) int64, CPU
        """Tokens per layer and logical expert over the last `window_steps` steps (a copy)."""
        return self._window_sum.to("cpu", copy=True)

    def total_load(self) -> torch.Tensor:  # (L, E) int64, CPU
        """Tokens per layer and logical expert since start (a copy)."""
        return self._total.to("cpu", copy=True)

    @property
    def num_window_steps(self) -> int:
        """Steps the window holds so far (at most `window_steps`)."""
        return min(self.num_steps, self.window_steps)
