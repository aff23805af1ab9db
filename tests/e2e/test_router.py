"""The KV router on a real Triton server with two decode workers."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.e2e

#: 20 full 16-token blocks (with the <s> token) that every follow-up request shares.
LONG_PREFIX = "Routing keeps a conversation where its cache is. " * 7  # 343 bytes


def requests_by_worker(client) -> dict[str, int]:
    return client.metric("triton_disagg_requests_total", missing_ok=True)


def prefix_hits_by_worker(client) -> dict[str, int]:
    return client.metric("triton_disagg_prefix_hit_tokens_total", missing_ok=True)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {worker: after.get(worker, 0) - before.get(worker, 0) for worker in ("decode_0", "decode_1")}


def send(client, prompt: str, **extra) -> None:
    client.generate(text_input=prompt, max_tokens=2, **extra)


def test_requests_sharing_a_long_prefix_land_on_the_worker_that_holds_it(two_decoders):
    before = requests_by_worker(two_decoders)
    send(two_decoders, LONG_PREFIX + "first turn")
    owner = next(w for w, n in delta(requests_by_worker(two_decoders), before).items() if n == 1)
    time.sleep(0.5)  # the owner's KV events reach the router within milliseconds
    before, hits_before = requests_by_worker(two_decoders), prefix_hits_by_worker(two_decoders)
    for turn in range(6):
        send(two_decoders, LONG_PREFIX + f"follow-up {turn}")
    placed = delta(requests_by_worker(two_decoders), before)
    assert placed[owner] == 6, placed
    # Each follow-up found the whole 336-token prefix (21 blocks less the partial one) cached.
    assert delta(prefix_hits_by_worker(two_decoders), hits_before)[owner] >= 6 * 20 * 16


def test_round_robin_override_spreads_the_same_requests(two_decoders):
    before = requests_by_worker(two_decoders)
    for turn in range(6):
        send(two_decoders, LONG_PREFIX + f"again {turn}", routing_mode="round_robin")
    assert delta(requests_by_worker(two_decoders), before) == {"decode_0": 3, "decode_1": 3}


def test_unknown_routing_mode_is_rejected(two_decoders):
    response = two_decoders.post_generate(text_input="hi", max_tokens=2, routing_mode="fastest")
    assert response.status_code == 400
    assert "routing_mode must be one of kv, approx, round_robin, random" in response.text
