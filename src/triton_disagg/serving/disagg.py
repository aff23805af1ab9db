"""Conditional disaggregation: should a decode worker have its prompt prefilled elsewhere?

Pure: inputs in, decision and reason out. Remote prefill pays a KV transfer
and an extra hop, so it is worth it only for a long uncached part of the
prompt, and only when the prefill pool has room.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class PrefillDecision:
    remote: bool
    reason: str  # "remote", "local_short_prompt", "local_prefill_saturated", "local_no_prefill_worker", "local_single_token"


def decide_prefill(
    num_prompt_tokens: int,
    num_local_hit_tokens: int,
    min_remote_tokens: int,
    max_tokens: int,
    prefill_worker: str | None,
    prefill_pool_saturated: bool,
) -> PrefillDecision:
    """Remote prefill when a prefill worker is offered and the uncached part is >= `min_remote_tokens`.

    >>> decide_prefill(1000, 960, 256, 32, "prefill_0", False).reason  # 40 uncached < 256
    'local_short_prompt'
    """
    if prefill_pool_saturated:
        return PrefillDecision(False, "local_prefill_saturated")
    if not prefill_worker:
        return PrefillDecision(False, "local_no_prefill_worker")
    if max_tokens < 2:  # the prefill's token is the whole answer: no KV to move
        return PrefillDecision(False, "local_single_token")
    if num_prompt_tokens - num_local_hit_tokens < min_remote_tokens:
        return PrefillDecision(False, "local_short_prompt")
    return PrefillDecision(True, "remote")
