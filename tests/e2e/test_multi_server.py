"""Serving across three Triton servers on their own loopback addresses: requests enter the entry server
(127.0.0.1: llm, router, KV directory), are prefilled in a second (127.0.0.2) and decoded in a third
(127.0.0.3, two decode workers), the KV moving between them over NIXL and the KV events over TCP."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from triton_disagg.deploy.load import parse_spec
from triton_disagg.launch.deployment import local_deployment
from triton_disagg.launch.server import free_ports
from triton_disagg.launch.server_group import ServerGroup

from tests.e2e.conftest import MIN_REMOTE_TOKENS, NUM_BLOCKS, Client
from tests.e2e.test_disagg import SHARED_PREFIX, decisions, greedy, pulls, wait_until_all_blocks_free

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
    with ServerGroup(local.server, local.worker_servers) as running:
        yield running


@pytest.fixture(scope="module")
def entry(group) -> Client:
    return Client(group.entry)


def test_requests_entering_one_server_are_prefilled_and_decoded_in_the_others_token_exact(group, entry, client):
    prefill_server, decode_server = (Client(server) for server in group.worker_servers)
    assert group.entry.worker_names == [] and group.worker_names == ["prefill_0", "decode_0", "decode_1"]
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
    assert set(prefill_server.total_blocks()) == {"prefill_0"} and set(decode_server.total_blocks()) == {"decode_0", "decode_1"}
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


def test_a_decode_server_that_went_away_gets_a_clear_unavailable_answer(group, entry):
    """Last in this module: it stops the decode server. The entry server keeps serving and says why."""
    decode = group.worker_servers[1]
    decode.stop()
    response = entry.post_generate(text_input="anyone there?", max_tokens=4)
    error = response.json()["error"]
    assert error.startswith("unavailable ("), response.text
    assert response.status_code == 400  # Triton's generate endpoint answers every model error with 400
    assert group.entry.is_running()
