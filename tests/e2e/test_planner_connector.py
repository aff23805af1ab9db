"""The planner's Triton connector grows and shrinks the decode pool on a real server, losing no request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from triton_disagg.planner.connectors import TritonConnector

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
        connector._call_router("drain", "decode_7")


def make_connector(client, **overrides) -> TritonConnector:
    server = client.server
    return TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository", **overrides)


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, "condition not met in time"
        time.sleep(0.02)


def router_knows(connector: TritonConnector, name: str) -> bool:
    try:
        connector._call_router("inflight", name)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("num_long", [0, 4])
def test_removing_a_worker_waits_for_every_request_routed_to_it(one_decoder, num_long):
    """decode_0 is drained, so every request goes to decode_1: `num_long` long ones, then
    one more that the drain follows as soon as the router has routed it, before it can
    have reached the engine (alone, it shows in none of decode_1's gauges yet). decode_1
    is unloaded only after it finished them all (its request counter, read at the unload
    call), none failed, and once the removal returns Triton no longer lists it READY."""
    connector = make_connector(one_decoder)
    assert connector.add_worker("decode") == "decode_1"
    wait_until(lambda: router_knows(connector, "decode_1"))
    before = served(one_decoder).get("decode_1", 0)
    served_at_unload = []
    unload = connector._control.unload

    def recording_unload(name, *args):
        served_at_unload.append(served(one_decoder).get(name, 0) - before)
        unload(name, *args)

    connector._control.unload = recording_unload
    connector._call_router("drain", "decode_0")
    try:
        with ThreadPoolExecutor(max_workers=num_long + 1) as pool:
            jobs = [
                pool.submit(one_decoder.generate, text_input=f"long request {i}", max_tokens=200, ignore_eos=True)
                for i in range(num_long)
            ]
            wait_until(lambda: connector._call_router("inflight", "decode_1") == num_long)
            jobs.append(pool.submit(one_decoder.generate, text_input="just in time", max_tokens=200, ignore_eos=True))
            wait_until(lambda: connector._call_router("inflight", "decode_1") == num_long + 1)
            assert connector.remove_worker("decode") == "decode_1"
            results = [job.result() for job in jobs]
    finally:
        connector._call_router("undrain", "decode_0")
    assert served_at_unload == [num_long + 1]
    assert [r["finish_reason"] for r in results] == ["length"] * (num_long + 1)
    assert connector._control.state_of("decode_1") in (None, "UNAVAILABLE")
    assert connector.workers("decode") == ["decode_0"]


def test_a_drain_that_times_out_is_called_off_and_the_worker_serves_again(one_decoder):
    """With decode_0 drained, the request after the failed removal can only go to
    decode_1: it succeeds because the connector undrained decode_1."""
    connector = make_connector(one_decoder, drain_timeout_s=0.3)
    assert connector.add_worker("decode") == "decode_1"
    wait_until(lambda: router_knows(connector, "decode_1"))
    connector._call_router("drain", "decode_0")
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Long enough to outlast the 0.3 s drain on any machine (200 tokens once took under 0.3 s).
            job = pool.submit(one_decoder.generate, text_input="keeps it busy", max_tokens=1500, ignore_eos=True)
            wait_until(lambda: connector._call_router("inflight", "decode_1") == 1)
            with pytest.raises(TimeoutError, match="decode_1 was not idle after 0.3 s of draining: the router counts 1 requests"):
                connector.remove_worker("decode")
            assert job.result()["finish_reason"] == "length"
        assert connector.workers("decode") == ["decode_0", "decode_1"]
        assert one_decoder.generate(text_input="served again", max_tokens=2)["finish_reason"] == "length"
    finally:
        connector._call_router("undrain", "decode_0")
    assert make_connector(one_decoder).remove_worker("decode") == "decode_1"
    assert connector.workers("decode") == ["decode_0"]
