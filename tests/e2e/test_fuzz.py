"""Fuzzed requests (hypothesis) against the real server and the OpenAI frontend: every input gets a 2xx or a
clear 4xx, never a 5xx of ours and never a hang, and the server keeps serving. A bounded run; the longer
one is `python -m triton_disagg.tools.fuzz`."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Client
from triton_disagg.frontend.config import FrontendConfig
from triton_disagg.launch.frontend import FrontendProcess
from triton_disagg.launch.server import free_ports
from triton_disagg.tools.fuzz import Tally, fuzz_openai, fuzz_triton_grpc, fuzz_triton_http, still_serves

pytestmark = pytest.mark.e2e


def assert_clean(tally: Tally, num_examples: int) -> None:
    assert tally.tried == num_examples
    assert (tally.server_5xx, tally.hangs) == (0, 0), tally.examples
    assert tally.client_4xx > 0  # the strategies do reach the validation paths


def test_fuzzed_triton_http_generate_bodies(client: Client):
    tally = fuzz_triton_http(client.server.http_url, num_examples=40)
    assert_clean(tally, 40)
    assert still_serves(client.server.http_url)


def test_fuzzed_triton_grpc_inputs(client: Client):
    tally = fuzz_triton_grpc(client.server.grpc_url, num_examples=25)
    assert_clean(tally, 25)
    assert still_serves(client.server.http_url)


@pytest.fixture(scope="module")
def fuzz_frontend(server, tmp_path_factory):
    (port,) = free_ports(1)
    config = FrontendConfig(triton_url=server.grpc_url, host="127.0.0.1", port=port, max_body_bytes=64 * 1024)
    with FrontendProcess(config, tmp_path_factory.mktemp("fuzz-frontend") / "frontend.log") as running:
        yield running


def test_fuzzed_openai_bodies(client: Client, fuzz_frontend, model_path):
    tally = fuzz_openai(fuzz_frontend.url, model_path.resolve().name, num_examples=40)
    assert_clean(tally, 40)
    assert tally.triton_parser_5xx == 0  # the frontend parses its bodies itself
    assert still_serves(client.server.http_url)
