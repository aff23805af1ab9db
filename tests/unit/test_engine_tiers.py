"""The real engine with host-memory and disk tiers: prefixes come back token-identical, nothing leaks."""

from __future__ import annotations

import os
import queue
import random
from pathlib import Path

import pytest
import torch

from triton_disagg.engine.async_engine import EngineThread
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import FinishReason, SamplingParams
from triton_disagg.engine.sequence import SequenceStatus
from triton_disagg.engine.tiers.block_file import PAYLOAD_OFFSET
from triton_disagg.router.events import AllCleared, Medium, WorkerId
from triton_disagg.router.hashing import hash_request_tokens
from triton_disagg.router.index import PrefixIndex

#: 12 blocks of 16 tokens: one 150-token prompt with its output (10 blocks) evicts another.
NUM_BLOCKS = 12
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPT_BLOCKS = 9  # full blocks of a 150-token prompt


def make_engine(model, **overrides) -> LLMEngine:
    config = {"model_path": str(model), "device": "cpu", "num_blocks": NUM_BLOCKS, "kv_host_blocks": 32}
    return LLMEngine(EngineConfig(**(config | overrides)))


def prompts(n: int, length: int = 150, seed: int = 0) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return {chr(ord("A") + i): torch.randint(0, 256, (length,), generator=generator).tolist() for i in range(n)}


@pytest.fixture(scope="module")
def cold(tiny_model) -> dict[str, list[int]]:
    """Greedy tokens of each prompt, computed from scratch without tiers."""
    engine = make_engine(tiny_model, num_blocks=64, kv_host_blocks=0)
    batch = prompts(7)
    return dict(zip(batch, engine.generate(list(batch.values()), PARAMS)))


class Runner:
    """Runs prompts one at a time on an engine and keeps the outputs."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.prompts = prompts(7)
        self.num_runs = 0

    def run(self, name: str):
        self.num_runs += 1
        request_id = f"{name}{self.num_runs}"
        self.engine.add_request(request_id, self.prompts[name], PARAMS)
        tokens, final = [], None
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                tokens += out.new_token_ids
                final = out if out.finished else final
        return tokens, final

    def run_all(self, names: str) -> None:
        for name in names:
            self.run(name)


def test_a_prefix_evicted_from_the_device_comes_back_from_host_memory(tiny_model, cold):
    engine = make_engine(tiny_model)
    runner = Runner(engine)
    runner.run_all("AB")  # B's blocks evict A's from the 12-block pool; A's went to host memory
    tokens, out = runner.run("A")
    assert tokens == cold["A"]
    assert out.num_cached_tokens == PROMPT_BLOCKS * 16 and out.num_host_hit_tokens > 0
    assert out.num_disk_hit_tokens == 0
    engine.check_integrity(expect_idle=True)
    # Without tiers the same sequence recomputes A's whole prompt.
    plain = Runner(make_engine(tiny_model, kv_host_blocks=0))
    plain.run_all("AB")
    tokens, plain_out = plain.run("A")
    assert tokens == cold["A"] and plain_out.num_cached_tokens < out.num_cached_tokens
    engine.shutdown()


def disk_engine(model, folder: Path, transport: str = "torch") -> LLMEngine:
    """Host memory for two prompts, so a third pushes the oldest to disk."""
    return make_engine(
        model, kv_host_blocks=20, kv_disk_path=str(folder), kv_disk_blocks=64, kv_tier_transport=transport
    )


def push_a_to_disk(runner: Runner) -> None:
    runner.run_all("ABA")  # A used twice: admitted to disk when host memory evicts it
    runner.run_all("CDEF")
    runner.engine.tiers.wait_idle()


@pytest.mark.parametrize("transport", ["torch", "nixl"])
def test_a_prefix_evicted_from_host_memory_comes_back_from_disk(tiny_model, cold, tmp_path, transport):
    if transport == "nixl":
        pytest.importorskip("nixl")
    engine = disk_engine(tiny_model, tmp_path, transport)
    runner = Runner(engine)
    push_a_to_disk(runner)
    tokens, out = runner.run("A")
    assert tokens == cold["A"]
    assert out.num_disk_hit_tokens == PROMPT_BLOCKS * 16 and out.num_cached_tokens == PROMPT_BLOCKS * 16
    assert engine.tiers.stats.onboarded_blocks["disk"] == PROMPT_BLOCKS
    engine.check_integrity(expect_idle=True)
    engine.shutdown()


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[PAYLOAD_OFFSET + 7] ^= 0x40
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


@pytest.mark.parametrize("damage", [_flip_byte, _truncate])
def test_a_damaged_disk_block_is_dropped_and_recomputed(tiny_model, cold, tmp_path, damage):
    engine = disk_engine(tiny_model, tmp_path)
    runner = Runner(engine)
    push_a_to_disk(runner)
    hashes = hash_request_tokens(runner.prompts["A"], 16)
    assert all(engine.tiers.find(h) is Medium.DISK for h in hashes)
    damage(engine.tiers.disk.path_of(hashes[3]))
    tokens, out = runner.run("A")
    assert tokens == cold["A"]
    assert out.num_disk_hit_tokens == 3 * 16  # the run stops at the damaged block; the rest is recomputed
    assert engine.tiers.stats.invalid_blocks == 1
    engine.check_integrity(expect_idle=True)
    assert not engine.tiers.disk.path_of(hashes[3]).exists()
    engine.shutdown()


def test_a_worker_restarted_on_the_same_disk_folder_reuses_its_blocks(tiny_model, cold, tmp_path):
    first = disk_engine(tiny_model, tmp_path)
    push_a_to_disk(Runner(first))
    first.shutdown()
    second = disk_engine(tiny_model, tmp_path)
    tokens, out = Runner(second).run("A")
    assert tokens == cold["A"] and out.num_disk_hit_tokens == PROMPT_BLOCKS * 16
    second.shutdown()


def test_capacity_holds_under_pressure_and_the_router_index_matches_every_tier(tiny_model, tmp_path):
    """Waves of prompts sharing prefixes through small tiers: outputs equal a cold run, tiers stay within
    capacity, the KV events rebuild exactly what each tier holds, and nothing leaks at the end."""
    rng = random.Random(3)
    heads = list(prompts(2, length=60, seed=1).values())  # waves alternate heads: a wave evicts the other's
    batch = [heads[i // 6 % 2] + [rng.randrange(256) for _ in range(rng.randrange(10, 90))] for i in range(24)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = make_engine(tiny_model, num_blocks=256, kv_host_blocks=0).generate(batch, params)
    engine = make_engine(tiny_model, num_blocks=24, kv_host_blocks=16, kv_disk_path=str(tmp_path), kv_disk_blocks=24)
    index = PrefixIndex()
    worker = WorkerId("w")
    index.add_worker(worker)
    results: dict[str, list[int]] = {}
    for wave in range(0, len(batch), 6):
        for i in range(wave, wave + 6):
            engine.add_request(f"r{i}", batch[i], params)
            results[f"r{i}"] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                results[out.request_id] += out.new_token_ids
            for event in engine.drain_kv_events():
                index.apply_event(worker, event)
            assert engine.tiers.host.num_resident <= 16 and engine.tiers.disk.num_resident <= 24
            engine.block_manager.check_integrity()
    assert [results[f"r{i}"] for i in range(len(batch))] == expected
    engine.check_integrity(expect_idle=True)
    for event in engine.drain_kv_events():
        index.apply_event(worker, event)
    held: dict[int, int] = {}
    for block_hash in engine.block_manager._cached:
        held[block_hash] = held.get(block_hash, 0) | Medium.DEVICE.bit
    for block_hash, _ in engine.tiers.host.entries():
        held[block_hash] = held.get(block_hash, 0) | Medium.HOST.bit
    for block_hash, _ in engine.tiers.disk.entries():
        held[block_hash] = held.get(block_hash, 0) | Medium.DISK.bit
    assert {h: index.media_mask(worker, h) for h, _ in index.dump()[worker]} == held
    stats = engine.tiers.stats
    assert stats.offloaded_blocks["host"] > 0 and stats.evicted_blocks["host"] > 0 and stats.offloaded_blocks["disk"] > 0
    assert stats.onboarded_blocks["host"] + stats.onboarded_blocks["disk"] > 0
    engine.shutdown()


def test_other_requests_step_while_one_onboards_and_an_abort_frees_its_blocks_after_the_copy(tiny_model, cold, gated_mover):
    engine = make_engine(tiny_model, num_blocks=24)
    runner = Runner(engine)
    runner.run_all("ABC")  # A's blocks are in host memory, no longer on the device
    engine.tiers.wait_idle()
    mover = engine.tiers.copier.mover = gated_mover
    mover.gate.clear()
    engine.add_request("a", runner.prompts["A"], PARAMS)
    engine.add_request("short", runner.prompts["B"][:20], PARAMS)
    outputs: list = []
    for _ in range(3):
        outputs += engine.step()
    seq = engine._seqs["a"]
    assert seq.status is SequenceStatus.ONBOARDING and engine.onboarding.num_active == 1
    assert any(out.request_id == "short" and out.new_token_ids for out in outputs)  # it ran meanwhile
    held = list(seq.block_ids)
    assert engine.abort_request("a")
    assert all(engine.block_manager.blocks[b].ref_count == 1 for b in held)  # the copy may still write them
    # The id is free again at once; the new request onboards the same blocks while the old copy still runs.
    engine.add_request("a", runner.prompts["A"], PARAMS)
    aborted = engine.step()
    assert [out.finish_reason for out in aborted if out.request_id == "a"] == [FinishReason.ABORT]
    assert engine.onboarding.num_active == 2
    mover.gate.set()
    later: list = []
    while engine.has_unfinished_requests() or engine.onboarding.num_active:
        later += engine.step()
    assert [t for out in later if out.request_id == "a" for t in out.new_token_ids] == cold["A"]
    engine.check_integrity(expect_idle=True)
    engine.shutdown()


def test_the_engine_thread_sleeps_through_an_onboarding_and_wakes_when_it_ends(tiny_model, cold):
    engine = make_engine(tiny_model)
    thread = EngineThread(engine)
    thread.start()
    finished: queue.Queue = queue.Queue()

    def run(name: str, request_id: str):
        tokens: list[int] = []

        def on_output(out):
            tokens.extend(out.new_token_ids)
            if out.finished:
                finished.put((request_id, tokens, out))

        thread.submit(request_id, prompts(2)[name], PARAMS, on_output, finished.put)
        return finished.get(timeout=60)

    run("A", "a1")
    run("B", "b1")
    request_id, tokens, out = run("A", "a2")
    assert tokens == cold["A"] and out.num_host_hit_tokens > 0
    thread.stop()
    engine.check_integrity(expect_idle=True)
    engine.shutdown()


def test_a_reset_clears_every_tier_and_announces_it_once(tiny_model, tmp_path):
    engine = disk_engine(tiny_model, tmp_path)
    push_a_to_disk(Runner(engine))
    assert engine.tiers.host.num_resident and engine.tiers.disk.num_resident
    engine.drain_kv_events()
    assert engine.reset_prefix_cache()
    assert engine.drain_kv_events() == [AllCleared()]
    assert engine.tiers.host.num_resident == engine.tiers.disk.num_resident == engine.block_manager.num_cached_blocks == 0
    assert list(tmp_path.glob("*.kvblock")) == []
    engine.check_integrity(expect_idle=True)
    engine.shutdown()
