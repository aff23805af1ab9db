"""Next-token sampling: greedy, temperature, top-k, top-p, with per-request seeds."""

from __future__ import annotations

import torch

from triton_disagg.engine.params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:  # (V,)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,  # (S, V) float32
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> list[int]:
    """One token per row. Greedy rows take the argmax; the others draw from their own generator.

    Each row's draw depends only on its logits and its generator, so a seeded
    request gets the same tokens whatever else is in the batch.
    """
    greedy = logits.argmax(dim=-1).tolist()
    tokens: list[int] = []
    for row, (param, generator) in enumerate(zip(params, generators)):
        if param.is_greedy:
            tokens.append(greedy[row])
            continue
        row_logits = _filter_top_k_top_p(logits[row] / param.temperature, param.top_k, param.top_p)
        probs = torch.softmax(row_logits, dim=-1).cpu()
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens
