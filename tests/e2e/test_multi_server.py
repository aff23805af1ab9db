"""Serving across three Triton servers on their own loopback addresses: requests enter the entry server
(127.0.0.1: llm, router, KV directory), are prefilled in a second (127.0.0.2) and decoded in a third
(127.0.0.3, two decode workers), the KV moving between them over NIXL and the KV events over TCP.
The entry server also runs decode_0, drained until the decode server is killed: somewhere to go."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from triton_disagg.deploy.load import parse_spec
from triton_disagg.launch.deployment import local_deployment
from triton_disagg.launch.server import free_ports
from triton_disagg.launch.server_group import ServerGroup
from triton_disagg.model_control import ModelControl, router_action

from tests.e2e.conftest import MIN_REMOTE_TOKENS, NUM_BLOCKS, Client
from tests.e2e.test_disagg import SHARED_PREFIX, decisions, greedy, pulls, wait_until_all_blocks_free
from tests.e2e.test_reliability import STREAM_TOKENS, llm_counter, stream_text, wait_for

pytestmark = pytest.mark.e2e

ADDRESSES = {"entry": "127.0.0.1", "prefill": "127.0.0.2", "decode": "127.0.0.3"}


def _can_bind(address: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def group(tmp_path_factory, model_path) -> Iterator[ServerGroup]:
    """The spec of docker/examples/local-multi-server.yaml on free ports, started as `serve --deployment` does."""
    if not all(_can_bind(address) for address in ADDRESSES.values()):
        pytest.skip("this machine cannot bind 127.0.0.2 and 127.0.0.3")
    ports = iter(free_ports(9))
    spec = {
        "name": "multi",
        "servers": [
            {"name": name, "address": address, "http_port": next(ports), "grpc_port": next(ports), "metrics_port": next(ports)}
            for name, address in ADDRESSES.items()
        ],
        "frontend": {"server": "entry", "port": 0},
        "models": [
            {
                "name": "tiny-llama",
                "llm_instances": 1,
                "router": {"min_remote_prefill_tokens": MIN_REMOTE_TOKENS, "kv_hold_timeout_s": 5.0},
                "pools": [
                    {"role": "prefill", "server": "prefill", "kv": {"num_blocks": NUM_BLOCKS}},
                    {"role": "decode", "server": "decode", "replicas": {"initial": 2}, "kv": {"num_blocks": NUM_BLOCKS}},
                ],
            }
        ],
    }
    local = local_deployment(
        parse_spec(spec), model_path=model_path, run_dir=tmp_path_factory.mktemp("multi"), exit_timeout_s=2, route_wait_s=2.0
    )
    prefill, decode = local.worker_servers
    # decode_0 in the entry server (a spec has one decode pool), decode_1 and decode_2 in the decode server.
    entry = dataclasses.replace(local.server, decode_workers=1)
    with ServerGroup(entry, [prefill, dataclasses.replace(decode, first_decode_id=1)]) as running:
        router_action(running.entry.http_url, "drain", "decode_0")
        yield running


@pytest.fixture(scope="module")
def entry(group) -> Client:
    return Client(group.entry)


def test_requests_entering_one_server_are_prefilled_and_decoded_in_the_others_token_exact(group, entry, client):
    prefill_server, decode_server = (Client(server) for server in group.worker_servers)
    assert group.worker_names == ["decode_0", "prefill_0", "decode_1", "decode_2"]
    prompts = [SHARED_PREFIX + suffix for suffix in ("one", "two two", "three three three")]
    prompts += ["An unrelated prompt that is long enough to be prefilled remotely, surely. " * 2]
    expected = [greedy(client, p) for p in prompts]  # one server, one aggregated worker
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        outputs = list(pool.map(lambda p: greedy(entry, p), prompts))
    assert outputs == expected
    # The handoff crossed servers: the decode worker (127.0.0.3) had every prompt prefilled remotely,
    # on the prefill worker (127.0.0.2), and pulled the KV from there.
    assert decisions(decode_server, "remote") == len(prompts)
    assert pulls(decode_server, "done") >= len(prompts)
    assert set(prefill_server.total_blocks()) == {"prefill_0"} and set(decode_server.total_blocks()) == {"decode_1", "decode_2"}
    # A short prompt is prefilled by the decode worker itself, and the output is the same too.
    assert greedy(entry, "Hello there") == greedy(client, "Hello there")
    for server in (prefill_server, decode_server):
        assert wait_until_all_blocks_free(server) == server.total_blocks()


def test_the_router_follows_kv_events_across_servers(group, entry):
    """Follow-ups of a long prompt all go to the decode worker (on 127.0.0.3) that holds its prefix: the
    entry server's router follows that server's KV events over TCP and scores the overlap."""
    decode_server = Client(group.worker_servers[1])
    prefix = "Routing keeps a conversation where its cache is, across servers too. " * 5

    def requests_by_worker() -> dict[str, int]:
        return decode_server.metric("triton_disagg_requests_total", missing_ok=True)

    before = requests_by_worker()
    entry.generate(text_input=prefix + "first turn", max_tokens=2)
    after = requests_by_worker()
    (owner,) = [w for w in after if after[w] - before.get(w, 0) == 1]
    time.sleep(0.5)  # the owner's KV events reach the router within milliseconds (as in test_router)
    for turn in range(4):
        entry.generate(text_input=prefix + f"follow-up {turn}", max_tokens=2)
    assert requests_by_worker()[owner] - after[owner] == 4


def test_a_decode_server_killed_mid_stream_loses_no_request(group, entry, client):
    """The decode server dies (SIGKILL) under a stream: the request moves to decode_0 in the entry server,
    from its prompt and the tokens already streamed, and the client's text equals an uninterrupted run."""
    decode_server = group.worker_servers[1]
    prompt = "Every token must arrive exactly once, whichever server decodes it. " * 2
    (expected, _) = stream_text(client, prompt)
    migrations = llm_counter(entry, "triton_disagg_llm_migrations_total")
    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(stream_text, entry, prompt, started)
        assert started.wait(120)
        router_action(group.entry.http_url, "undrain", "decode_0")
        os.killpg(decode_server.pid, signal.SIGKILL)
        assert job.result() == (expected, STREAM_TOKENS)
    # llm publishes its counters every 0.5 s, and the migrated stream may end sooner than that.
    assert wait_for(lambda: llm_counter(entry, "triton_disagg_llm_migrations_total") - migrations >= 1, 10)
    assert greedy(entry, "after the kill") == greedy(client, "after the kill")


def test_with_the_worker_servers_gone_the_entry_serves_then_names_the_servers_that_do_not_answer(group, entry, client):
    """Last in this module. The prefill server dies too: a long prompt is prefilled by decode_0 (entry
    server), token-exact. Then decode_0 is unloaded: the answer names both servers that do not answer."""
    prefill_server, decode_server = group.worker_servers
    os.killpg(prefill_server.pid, signal.SIGKILL)
    prompt = SHARED_PREFIX + "prefilled where the decode worker is, now."
    assert greedy(entry, prompt) == greedy(client, prompt)
    control = ModelControl(group.entry.http_url)
    try:
        control.unload("decode_0")
    finally:
        control.close()

    def answer() -> str:
        response = entry.post_generate(text_input="anyone there?", max_tokens=4)
        assert response.status_code == 400  # Triton's generate endpoint answers every model error with 400
        return response.json()["error"]

    # A worker server's workers leave the router once it has not answered for 3 s.
    urls = ", ".join(server.grpc_url for server in (prefill_server, decode_server))
    expected = f"unavailable (no_workers): no decode worker is loaded; the Triton servers at {urls} do not answer"
    assert wait_for(lambda: answer().startswith(expected), 30), answer()
    assert group.entry.is_running()
