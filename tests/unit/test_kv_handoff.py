"""Prefill and decode engines in one process, KV moved by real NIXL (UCX, host memory)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import msgpack
import pytest
import torch

pytest.importorskip("nixl")

from triton_disagg.engine.config import EngineConfig  # noqa: E402
from triton_disagg.engine.kv_connector import RemoteKV  # noqa: E402
from triton_disagg.engine.llm_engine import LLMEngine  # noqa: E402
from triton_disagg.engine.params import SamplingParams  # noqa: E402
from triton_disagg.kv_transfer.handle import InvalidKVHandle, KVHandle  # noqa: E402
from triton_disagg.kv_transfer.layout import merge_runs  # noqa: E402
from triton_disagg.kv_transfer.nixl_connector import NixlConnector  # noqa: E402

NUM_BLOCKS = 64
BLOCK_SIZE = 16
#: Where the KV pools live; "cuda" registers GPU memory with NIXL.
DEVICE = os.environ.get("TRITON_DISAGG_TEST_DEVICE", "cpu")


def make_engine(model, name: str | None = None, **overrides) -> LLMEngine:
    config = EngineConfig(
        **({"model_path": str(model), "device": DEVICE, "dtype": "float32", "num_blocks": NUM_BLOCKS} | overrides)
    )
    if name is None:
        return LLMEngine(config)
    agent = f"{name}-{uuid.uuid4().hex[:8]}"
    return LLMEngine(config, kv_connector_factory=lambda pool: NixlConnector(agent, pool))


@pytest.fixture
def pair(tiny_model):
    prefill, decode = make_engine(tiny_model, "prefill"), make_engine(tiny_model, "decode")
    decode.kv_connector.add_peer_threadsafe(prefill.kv_connector.layout, prefill.kv_connector.metadata)
    return prefill, decode


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def prefill_remotely(prefill: LLMEngine, request_id: str, prompt: list[int]) -> RemoteKV:
    prefill.add_request(request_id, prompt, SamplingParams(max_tokens=1), hold_kv=True)
    while True:
        for out in prefill.step():
            if out.finished:
                handle = KVHandle(
                    agent_name=prefill.kv_connector.agent_name,
                    hold_id=request_id,
                    block_ids=out.held_block_ids,
                    block_hashes=out.held_block_hashes,
                    num_tokens=len(prompt),
                    block_size=prefill.block_size,
                )
                return RemoteKV(KVHandle.decode(handle.encode()), out.new_token_ids[0])


def decode_remotely(
    decode: LLMEngine, request_id: str, prompt: list[int], remote: RemoteKV, max_tokens: int, prefill: LLMEngine | None = None
) -> list[int]:
    """Decode a remotely prefilled prompt. The prefill engine steps alongside, as its own thread would:
    NIXL makes progress (serves the READ, delivers the release) only when its agent is polled."""
    decode.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), remote_kv=remote)
    tokens = [remote.first_token_id]
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens += out.new_token_ids
        if prefill is not None:
            prefill.step()
    return tokens


def drain_holds(prefill: LLMEngine, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while prefill.needs_polling() and time.monotonic() < deadline:
        prefill.step()


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


def prompt_kv_digest(engine: LLMEngine, block_ids, num_tokens: int) -> str:
    """SHA-256 of the K/V of the first `num_tokens` positions, all layers, in position order."""
    kv = engine.runner.kv_pool[list(block_ids)]  # (nb, L, 2, BS, KVH, D)
    kv = kv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :num_tokens]  # (L, 2, S, KVH, D)
    return hashlib.sha256(kv.contiguous().cpu().numpy().tobytes()).hexdigest()


def test_disaggregated_equals_aggregated(pair, tiny_model):
    prefill, decode = pair
    shared = prompts([70], seed=5)[0]
    batch = prompts([20, 45]) + [shared + [1, 2, 3], shared + [9] * 20, shared]
    expected = make_engine(tiny_model).generate(batch, GREEDY)
    for i, prompt in enumerate(batch):
        remote = prefill_remotely(prefill, f"r{i}", prompt)
        assert decode_remotely(decode, f"r{i}", prompt, remote, 24, prefill) == expected[i]
    stats = decode.handoff.stats
    assert (stats.pulls_done, stats.pulls_fallback) == (5, 0)
    # Requests 3-5 share a 64-token (4-block) prefix that decode cached from request 3.
    assert stats.blocks_reused_locally == 8
    drain_holds(prefill)
    assert prefill.handoff.stats.holds_released == len(batch)
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == NUM_BLOCKS
        engine.block_manager.check_integrity()


def test_pulled_kv_bytes_equal_what_prefill_computed(pair):
    prefill, decode = pair
    prompt = prompts([53])[0]
    remote = prefill_remotely(prefill, "r", prompt)
    decode.add_request("r", prompt, GREEDY, remote_kv=remote)
    while decode.handoff.stats.pulls_done == 0:
        decode.step()
        prefill.step()
    decode_blocks = decode._seqs["r"].block_ids
    assert prompt_kv_digest(decode, decode_blocks, len(prompt)) == prompt_kv_digest(prefill, remote.handle.block_ids, len(prompt))


def test_pull_failure_falls_back_to_local_prefill(pair, tiny_model):
    prefill, decode = pair
    prompt = prompts([40])[0]
    expected = make_engine(tiny_model).generate([prompt], GREEDY)[0]
    remote = prefill_remotely(prefill, "r", prompt)
    forged = KVHandle(remote.handle.agent_name, "r", (60, 61, 999), remote.handle.block_hashes, 40, BLOCK_SIZE)
    assert decode_remotely(decode, "a", prompt, RemoteKV(forged, remote.first_token_id), 24, prefill) == expected
    unknown = KVHandle("no-such-agent", "r", remote.handle.block_ids, remote.handle.block_hashes, 40, BLOCK_SIZE)
    assert decode_remotely(decode, "b", prompt, RemoteKV(unknown, remote.first_token_id), 24, prefill) == expected
    assert decode.handoff.stats.pulls_fallback == 2
    assert decode.block_manager.num_free_blocks == NUM_BLOCKS
    drain_holds(prefill)  # the fallback still told prefill to release
    assert prefill.block_manager.num_free_blocks == NUM_BLOCKS


def test_prefill_worker_gone_mid_request_falls_back(tiny_model):
    prefill, decode = make_engine(tiny_model, "prefill"), make_engine(tiny_model, "decode")
    decode.kv_connector.add_peer_threadsafe(prefill.kv_connector.layout, prefill.kv_connector.metadata)
    prompt = prompts([40])[0]
    expected = make_engine(tiny_model).generate([prompt], GREEDY)[0]
    remote = prefill_remotely(prefill, "r", prompt)
    decode.kv_connector._apply_incoming()
    decode.kv_connector.forget_peer(remote.handle.agent_name)  # as when the prefill model is unloaded
    assert decode_remotely(decode, "r", prompt, remote, 24, prefill) == expected
    assert decode.handoff.stats.pulls_fallback == 1


def test_unpulled_hold_expires(tiny_model):
    prefill = make_engine(tiny_model, "prefill", kv_hold_timeout_s=0.05)
    prefill_remotely(prefill, "r", prompts([40])[0])
    assert prefill.block_manager.num_free_blocks == NUM_BLOCKS - 3
    time.sleep(0.06)
    prefill.step()
    assert prefill.handoff.stats.holds_expired == 1
    assert prefill.block_manager.num_free_blocks == NUM_BLOCKS


def test_abort_while_pulling_frees_blocks_on_both_sides(pair):
    prefill, decode = pair
    prompt = prompts([60])[0]
    remote = prefill_remotely(prefill, "r", prompt)
    decode.add_request("r", prompt, GREEDY, remote_kv=remote)
    decode.step()  # allocates and starts the pull
    assert decode.abort_request("r")
    while decode.needs_polling() or decode.has_unfinished_requests():
        decode.step()
        prefill.step()
    drain_holds(prefill)
    assert decode.block_manager.num_free_blocks == NUM_BLOCKS
    assert prefill.block_manager.num_free_blocks == NUM_BLOCKS


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\xc1garbage", "not a valid handle encoding"),
        (msgpack.packb([9, "a", "h", [1], [], 3, 16]), "version 9 is not supported"),
        (msgpack.packb([1, "a", "h", [1, 2], [], 3, 16]), "has 2 blocks for 3 tokens"),
        (msgpack.packb([1, "a", "h", [-1], [], 3, 16]), "non-negative integers"),
        (msgpack.packb([1, "", "h", [1], [], 3, 16]), "non-empty strings"),
        (msgpack.packb({"a": 1}), "wrong structure"),
    ],
)
def test_malformed_handles_are_rejected(raw, message):
    with pytest.raises(InvalidKVHandle, match=message):
        KVHandle.decode(raw)


def test_handle_block_size_and_length_must_match_the_request(pair):
    prefill, decode = pair
    prompt = prompts([20])[0]
    remote = prefill_remotely(prefill, "r", prompt)
    with pytest.raises(InvalidKVHandle, match="covers 20 tokens but the prompt has 19"):
        decode.add_request("x", prompt[:-1], GREEDY, remote_kv=remote)
    assert not decode.has_unfinished_requests()


def test_merge_runs_pairs_consecutive_blocks():
    assert merge_runs([4, 5, 6, 9, 10], [0, 1, 2, 3, 4]) == [(4, 0, 3), (9, 3, 2)]
    assert merge_runs([1, 2], [7, 3]) == [(1, 7, 1), (2, 3, 1)]
    assert merge_runs([], []) == []


def test_a_decode_worker_brings_back_its_own_host_blocks_and_pulls_only_the_rest(tiny_model):
    prefill = make_engine(tiny_model, "prefill")
    decode = make_engine(tiny_model, "decode", num_blocks=16, kv_host_blocks=32)
    decode.kv_connector.add_peer_threadsafe(prefill.kv_connector.layout, prefill.kv_connector.metadata)
    shared, other = prompts([100, 200], seed=3)
    prompt = shared + [5] * 10  # 110 tokens: 6 full blocks of `shared`, then a partial one
    expected = make_engine(tiny_model, kv_host_blocks=0).generate([prompt], GREEDY)[0]
    filler = SamplingParams(max_tokens=30, ignore_eos=True)
    decode.generate([shared], filler)
    decode.generate([other], filler)  # 15 of the 16 blocks: all of `shared`'s but its head go to host memory
    decode.tiers.wait_idle()
    remote = prefill_remotely(prefill, "r", prompt)
    assert decode_remotely(decode, "r", prompt, remote, 24, prefill) == expected
    stats = decode.handoff.stats
    assert (stats.blocks_reused_locally, stats.blocks_pulled, stats.pulls_done) == (6, 1, 1)
    assert decode.tiers.stats.onboarded_blocks["host"] == 5  # and its head block was still on the device
    drain_holds(prefill)
    for engine in (prefill, decode):
        engine.check_integrity(expect_idle=True)
        engine.shutdown()
