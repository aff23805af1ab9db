"""Pure parts of disaggregated serving: the prefill decision, worker choice, the KV directory, parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triton_disagg.engine.params import InvalidRequest
from triton_disagg.kv_transfer.directory import KVDirectory
from triton_disagg.kv_transfer.layout import PoolLayout
from triton_disagg.serving.disagg import decide_prefill
from triton_disagg.serving.live_workers import split_workers, worker_loads
from triton_disagg.serving.protocol import (
    DecodeGenerate,
    HoldCheck,
    parse_decode_request,
    parse_prefill_request,
    parse_routing_mode,
)
from triton_disagg.router.config import RoutingMode
from triton_disagg.router.selection import WorkerMetrics


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


def test_split_workers_keeps_numbered_prefill_and_decode_models():
    names = ["llm", "decode_1", "prefill_0", "kv_transfer", "decode", "decode_0", "router", "prefill"]
    assert split_workers(names) == (["prefill_0"], ["decode_0", "decode_1"])


@pytest.mark.parametrize("text, mode", [(None, None), ("", None), (" Round_Robin ", RoutingMode.ROUND_ROBIN)])
def test_parse_routing_mode(text, mode):
    assert parse_routing_mode(text) == mode


def test_unknown_routing_mode_names_the_choices():
    with pytest.raises(InvalidRequest, match="routing_mode must be one of kv, approx, round_robin, random"):
        parse_routing_mode("fastest")


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


def test_worker_loads_from_the_metrics_page():
    page = "\n".join(
        [
            "# HELP triton_disagg_kv_blocks KV blocks in the worker's pool",
            'triton_disagg_kv_blocks{model="decode_0"} 256',
            'triton_disagg_kv_free_blocks{model="decode_0"} 200',
            'triton_disagg_waiting_prompt_tokens{model="decode_0"} 48',
            'triton_disagg_kv_blocks{model="prefill_0"} 128',
            'triton_disagg_kv_free_blocks{model="prefill_0"} 128',
            'nv_inference_count{model="llm",version="1"} 3',
        ]
    )
    assert worker_loads(page) == {
        "decode_0": WorkerMetrics(active_decode_blocks=56, queued_prefill_tokens=48, capacity_blocks=256),
        "prefill_0": WorkerMetrics(active_decode_blocks=0, queued_prefill_tokens=0, capacity_blocks=128),
    }
