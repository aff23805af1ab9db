"""Through a real Triton server: a conversation's prefix evicted from the worker's pool comes back from
host memory, then from disk, with the same tokens, and the per-tier metrics count it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.e2e.conftest import Client, _start

pytestmark = pytest.mark.e2e

#: 24 blocks of 16 tokens: one 300-byte prompt (19 blocks with its output) evicts another.
NUM_BLOCKS = 24
HOST_BLOCKS = 64  # three such prompts
PROMPT_BLOCKS = 18  # full blocks of a 300-byte prompt plus BOS


@pytest.fixture(scope="module")
def tiered(tmp_path_factory, model_path) -> Iterator[Client]:
    with _start(
        tmp_path_factory,
        model_path,
        prefill_workers=0,
        decode_workers=1,
        num_blocks=NUM_BLOCKS,
        kv_host_blocks=HOST_BLOCKS,
        kv_disk_path=tmp_path_factory.mktemp("kv-disk"),
        kv_disk_blocks=256,
    ) as running:
        yield Client(running)


def text(seed: str) -> str:
    return (seed * 300)[:300]


def tier_metric(client: Client, name: str, tier: str) -> int:
    return client.metric(name, tier=tier)["decode_0"]


def wait_for_metric(client: Client, name: str, tier: str, at_least: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (value := tier_metric(client, name, tier)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_a_returning_prompt_comes_back_from_host_memory_then_from_disk(tiered):
    def generate(prompt: str) -> str:
        return tiered.generate(text_input=prompt, max_tokens=8, ignore_eos=True, exclude_input_in_output=True)["text_output"]

    first = generate(text("a conversation "))
    for seed in ("b filler ", "c filler "):
        generate(text(seed))
    assert generate(text("a conversation ")) == first
    assert wait_for_metric(tiered, "triton_disagg_kv_tier_onboarded_blocks_total", "host", 1) >= PROMPT_BLOCKS - 1
    # The conversation was used twice: host memory sends it to disk when four more prompts push it out.
    for seed in ("d filler ", "e filler ", "f filler ", "g filler "):
        generate(text(seed))
    assert wait_for_metric(tiered, "triton_disagg_kv_tier_offloaded_blocks_total", "disk", PROMPT_BLOCKS) >= PROMPT_BLOCKS
    assert generate(text("a conversation ")) == first
    assert wait_for_metric(tiered, "triton_disagg_kv_tier_onboarded_blocks_total", "disk", 1) > 0
    for name in ("triton_disagg_kv_tier_blocks", "triton_disagg_kv_tier_evicted_blocks_total", "triton_disagg_kv_tier_hit_ratio"):
        for tier in ("device", "host", "disk"):
            tier_metric(tiered, name, tier)  # every tier has its series
    assert tier_metric(tiered, "triton_disagg_kv_tier_capacity_blocks", "host") == HOST_BLOCKS
    assert tier_metric(tiered, "triton_disagg_kv_tier_invalid_blocks_total", "disk") == 0
    assert tier_metric(tiered, "triton_disagg_kv_tier_bytes_total", "host") > 0
    # Nothing is held once the requests are done.
    deadline = time.monotonic() + 10
    while tiered.free_blocks() != tiered.total_blocks() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tiered.free_blocks() == tiered.total_blocks()
