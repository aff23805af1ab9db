"""Serving across Triton servers, the parts that run without one: where workers are, gRPC requests as
Triton reads them, and how a directory entry names its server."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2

from triton_disagg.errors import InvalidRequest
from triton_disagg.kv_transfer.directory import KVDirectory
from triton_disagg.kv_transfer.layout import PoolLayout
from triton_disagg.serving.migration import lost_worker_reason
from triton_disagg.serving.model_calls import _outputs_of, infer_request
from triton_disagg.serving.worker_servers import ServerAddress, WorkerInfo, WorkerLocations

PREFILL_SERVER = ServerAddress("127.0.0.2", 8000, 8001, 8002)
DECODE_SERVER = ServerAddress("127.0.0.3", 8000, 8001, 8002)


def locations(**overrides) -> WorkerLocations:
    found = WorkerLocations(**({"unreachable_after_s": 3.0, "forget_after_s": 60.0} | overrides))
    for address in (None, PREFILL_SERVER, DECODE_SERVER):
        assert found.add_server(address, now_s=0.0)
    return found


def test_workers_are_located_on_the_server_that_lists_them():
    found = locations()
    found.on_poll(None, ["llm", "router", "kv_transfer"], now_s=1.0)
    found.on_poll(PREFILL_SERVER, ["prefill_0"], now_s=1.0)
    found.on_poll(DECODE_SERVER, ["decode_0", "decode_1"], now_s=1.0)
    assert found.workers() == {
        "llm": None, "router": None, "kv_transfer": None,
        "prefill_0": PREFILL_SERVER, "decode_0": DECODE_SERVER, "decode_1": DECODE_SERVER,
    }  # fmt: skip
    assert not found.add_server(DECODE_SERVER, now_s=2.0)  # announced again: nothing changes


def test_a_silent_server_loses_its_workers_after_unreachable_after_s_and_is_forgotten_later():
    found = locations()
    found.on_poll(DECODE_SERVER, ["decode_0"], now_s=1.0)
    found.on_poll(DECODE_SERVER, None, now_s=3.9)  # 2.9 s silent: kept
    assert found.workers() == {"decode_0": DECODE_SERVER}
    found.on_poll(DECODE_SERVER, None, now_s=4.0)  # 3.0 s silent: its workers leave
    assert (found.workers(), found.unreachable_servers()) == ({}, [DECODE_SERVER])
    assert found.expire(now_s=60.9) == [PREFILL_SERVER]  # never answered since it was added at 0 s
    assert found.expire(now_s=61.0) == [DECODE_SERVER]
    assert found.servers == [None]


def test_the_entry_servers_failed_poll_keeps_its_view():
    found = locations()
    found.on_poll(None, ["decode_0"], now_s=1.0)
    found.on_poll(None, None, now_s=100.0)
    assert found.workers() == {"decode_0": None} and found.expire(now_s=1000.0) == [PREFILL_SERVER, DECODE_SERVER]


def test_a_worker_listed_by_two_servers_stays_on_the_entry_server_else_on_the_latest():
    found = locations()
    found.on_poll(PREFILL_SERVER, ["decode_0"], now_s=1.0)
    found.on_poll(DECODE_SERVER, ["decode_0"], now_s=2.0)
    assert found.workers() == {"decode_0": DECODE_SERVER}
    found.on_poll(None, ["decode_0"], now_s=0.5)
    assert found.workers() == {"decode_0": None}


def test_server_address_round_trips_and_bad_ones_name_the_problem():
    assert ServerAddress.decode(DECODE_SERVER.encode()) == DECODE_SERVER
    assert (DECODE_SERVER.http_url, DECODE_SERVER.grpc_url, DECODE_SERVER.metrics_url) == (
        "http://127.0.0.3:8000", "127.0.0.3:8001", "http://127.0.0.3:8002/metrics"
    )  # fmt: skip
    with pytest.raises(InvalidRequest, match="server must be JSON with host, http_port, grpc_port and metrics_port"):
        ServerAddress.decode('{"host": "127.0.0.3"}')
    with pytest.raises(InvalidRequest, match="needs a host and ports in 1..65535"):
        ServerAddress.decode('{"host": "127.0.0.3", "http_port": 0, "grpc_port": 1, "metrics_port": 2}')
    info = WorkerInfo("tcp://127.0.0.3:5000", "tcp://127.0.0.3:5001", "decode_0-ab12cd34")
    assert WorkerInfo.decode(info.encode()) == info


def test_a_grpc_request_carries_inputs_as_triton_reads_them_and_outputs_come_back_by_name():
    inputs = {"action": np.array([b"route", b"x"], dtype=np.object_), "input_ids": np.array([3, 4, 5], dtype=np.int32)}
    request = infer_request("router", inputs, ["decode_worker"], request_id="r1")
    assert (request.model_name, request.id, [o.name for o in request.outputs]) == ("router", "r1", ["decode_worker"])
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [("action", "BYTES", [2]), ("input_ids", "INT32", [3])]
    assert request.raw_input_contents[0] == b"\x05\x00\x00\x00route\x01\x00\x00\x00x"  # length-prefixed, little-endian
    assert request.raw_input_contents[1] == np.array([3, 4, 5], dtype="<i4").tobytes()
    response = service_pb2.ModelInferResponse(model_name="router")
    response.outputs.add(name="overlap_blocks", datatype="INT32", shape=[1])
    response.raw_output_contents.append(np.array([7], dtype=np.int32).tobytes())
    assert _outputs_of(response, ["overlap_blocks"]).output("overlap_blocks").tolist() == [7]


def test_an_unreachable_server_reads_as_a_dead_worker():
    assert lost_worker_reason("Triton server unreachable at 127.0.0.3:8001: connection refused") == "dead"


def test_a_directory_drops_only_the_entries_of_the_server_polled():
    directory = KVDirectory()
    pool = torch.zeros(4, 2, 2, 16, 1, 8)
    local = PoolLayout.of_pool("decode_0-aa", pool, "decode_0")
    remote = PoolLayout.of_pool("prefill_0-bb", pool, "prefill_0")
    remote = dataclasses.replace(remote, server_url=PREFILL_SERVER.grpc_url)
    assert PoolLayout.decode(remote.encode()) == remote
    directory.register(local, b"m1")
    directory.register(remote, b"m2")
    assert directory.server_urls() == ["127.0.0.2:8001"]
    assert directory.retain_models(set(), server_url="") == ["decode_0-aa"]
    assert directory.retain_models({"prefill_0"}, server_url=PREFILL_SERVER.grpc_url) == []
    assert directory.retain_models(set(), server_url=PREFILL_SERVER.grpc_url) == ["prefill_0-bb"]
