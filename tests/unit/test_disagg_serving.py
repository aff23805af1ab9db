"""Pure parts of disaggregated serving: the prefill decision, worker choice, the KV directory, parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from python_backends.engine.params import InvalidRequest
from python_backends.kv_transfer.directory import KVDirectory
from python_backends.kv_transfer.layout import PoolLayout
from python_backends.serving.disagg import decide_prefill
from python_backends.serving.protocol import DecodeGenerate, HoldCheck, parse_decode_request, parse_prefill_request
from python_backends.serving.worker_pool import WorkerChoice, WorkerPool


def decide(**overrides):
    args = dict(
        num_prompt_tokens=1000,
        num_local_hit_tokens=0,
        min_remote_tokens=256,
        max_tokens=32,
        prefill_worker="prefill_0",
        prefill_pool_saturated=False,
    )
    return decide_prefill(**(args | overrides))


@pytest.mark.parametrize(
    "overrides, remote, reason",
    [
        ({}, True, "remote"),
        ({"num_local_hit_tokens": 745}, False, "local_short_prompt"),  # 1000 - 745 = 255 uncached < 256
        ({"num_local_hit_tokens": 744}, True, "remote"),  # 256 uncached: exactly the threshold goes remote
        ({"num_local_hit_tokens": 960}, False, "local_short_prompt"),  # 40 uncached
        ({"prefill_pool_saturated": True, "prefill_worker": None}, False, "local_prefill_saturated"),
        ({"prefill_worker": None}, False, "local_no_prefill_worker"),
        ({"max_tokens": 1}, False, "local_single_token"),
        ({"min_remote_tokens": 0, "num_prompt_tokens": 3}, True, "remote"),
    ],
)
def test_decide_prefill(overrides, remote, reason):
    decision = decide(**overrides)
    assert (decision.remote, decision.reason) == (remote, reason)


def test_pool_picks_least_loaded_and_rotates_ties():
    pool = WorkerPool(max_prefills_in_flight=2)
    pool.set_live(["llm", "decode_0", "decode_1", "prefill_0", "kv_transfer", "decode"])
    assert pool.decode_workers == ["decode_0", "decode_1"] and pool.prefill_workers == ["prefill_0"]
    first, second = pool.choose(), pool.choose()
    assert {first.decode_worker, second.decode_worker} == {"decode_0", "decode_1"}
    assert first.prefill_worker == second.prefill_worker == "prefill_0"
    third = pool.choose()  # prefill_0 has 2 in flight: the pool is saturated
    assert third == WorkerChoice(third.decode_worker, None, True)
    pool.prefill_done(first)
    assert pool.choose().prefill_worker == "prefill_0"


def test_pool_keeps_counts_across_refreshes_and_drops_gone_workers():
    pool = WorkerPool()
    pool.set_live(["decode_0", "decode_1"])
    busy = pool.choose()
    pool.set_live(["decode_0", "decode_1", "decode_2"])
    idle = {pool.choose().decode_worker for _ in range(2)}
    assert busy.decode_worker not in idle
    pool.set_live([])
    with pytest.raises(LookupError, match="no decode worker is ready"):
        pool.choose()
    pool.request_done(busy)  # a worker that left: ignored


def layout(name: str) -> PoolLayout:
    return PoolLayout.of_pool(name, torch.zeros(4, 2, 2, 16, 2, 8), model_name=name.split("-")[0])


def test_directory_register_lookup_unregister_and_layout_round_trip():
    directory = KVDirectory()
    directory.register(layout("prefill_0-aa"), b"meta")
    entry = directory.lookup("prefill_0-aa")
    assert entry.metadata == b"meta" and PoolLayout.decode(entry.layout.encode()) == entry.layout
    assert entry.layout.model_name == "prefill_0" and entry.layout.block_bytes == 2 * 2 * 16 * 2 * 8 * 4
    assert directory.agent_names() == ["prefill_0-aa"]
    assert directory.unregister("prefill_0-aa") and directory.lookup("prefill_0-aa") is None
    with pytest.raises(ValueError, match="without NIXL metadata"):
        directory.register(layout("x-1"), b"")


def test_layouts_of_other_shapes_are_incompatible():
    a = layout("a-1")
    b = PoolLayout.of_pool("b-1", torch.zeros(4, 2, 2, 32, 2, 8))
    assert a.is_compatible(layout("c-1")) and not a.is_compatible(b)


def test_parse_decode_request_with_and_without_handle():
    base = {"input_ids": np.array([1, 2, 3], dtype=np.int32), "max_tokens": np.array([5], dtype=np.int32)}
    parsed = parse_decode_request(base | {"prefill_worker": np.array([b"prefill_1"], dtype=np.object_)})
    assert isinstance(parsed, DecodeGenerate) and parsed.prefill_worker == "prefill_1" and parsed.kv_handle is None
    with_handle = parse_decode_request(
        base | {"kv_handle": np.array([1, 2], dtype=np.uint8), "first_token": np.array([7], dtype=np.int32)}
    )
    assert (with_handle.kv_handle, with_handle.first_token_id) == (b"\x01\x02", 7)
    with pytest.raises(InvalidRequest, match="kv_handle and first_token go together"):
        parse_decode_request(base | {"kv_handle": np.array([1], dtype=np.uint8)})


def test_parse_prefill_request_samples_one_token_or_checks_a_hold():
    parsed = parse_prefill_request({"input_ids": np.array([1, 2], dtype=np.int32), "temperature": np.array([0.5])})
    assert parsed.params.max_tokens == 1 and parsed.params.temperature == 0.5
    assert parse_prefill_request({"check_hold_id": np.array([b"h1"], dtype=np.object_)}) == HoldCheck("h1")
