"""The planner's Triton connector grows and shrinks the decode pool on a real server, losing no request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from planner.connectors import TritonConnector

pytestmark = pytest.mark.e2e


def served(client) -> dict[str, int]:
    return client.metric("triton_disagg_requests_total", missing_ok=True)


def test_load_a_decode_worker_then_drain_and_unload_it(one_decoder):
    server = one_decoder.server
    connector = TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository")
    assert connector.workers("decode") == ["decode_0"]

    assert connector.add_worker("decode") == "decode_1"
    assert connector.workers("decode") == ["decode_0", "decode_1"]
    time.sleep(1.5)  # the router polls the repository index every second
    before = served(one_decoder)
    for i in range(4):
        one_decoder.generate(text_input=f"spread me {i}", max_tokens=2, routing_mode="round_robin")
    assert served(one_decoder).get("decode_1", 0) - before.get("decode_1", 0) == 2  # the router sends it traffic

    prompts = [f"long running request {i}" for i in range(6)]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        jobs = [pool.submit(one_decoder.generate, text_input=p, max_tokens=150, ignore_eos=True) for p in prompts]
        time.sleep(0.5)  # in flight on both workers
        assert connector.remove_worker("decode") == "decode_1"
        results = [job.result() for job in jobs]
    assert [r["finish_reason"] for r in results] == ["length"] * len(prompts)
    assert connector.workers("decode") == ["decode_0"]
    assert one_decoder.generate(text_input="after the unload", max_tokens=2)["finish_reason"] == "length"


def test_draining_an_unknown_worker_is_refused(one_decoder):
    server = one_decoder.server
    connector = TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository")
    with pytest.raises(RuntimeError, match="is not a live prefill or decode worker"):
        connector._drain("decode_7")
