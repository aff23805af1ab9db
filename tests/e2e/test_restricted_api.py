"""A server started with a model-control key: its repository API is refused without the key, and the
launcher, the router and the planner's connector, which hold it, still load, see and unload workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from triton_disagg.planner.connectors import TritonConnector
from tests.e2e.conftest import CLOSE_CONNECTION, Client, _start
from triton_disagg.cli.plan import PlanSettings

pytestmark = pytest.mark.e2e

KEY = "k3y=with:odd,chars"
HEADER = "triton-disagg-key"


@pytest.fixture(scope="module")
def restricted(tmp_path_factory, model_path) -> Iterator[Client]:
    """One decode worker, loaded at start by the launcher through the restricted API."""
    with _start(tmp_path_factory, model_path, prefill_workers=0, decode_workers=1, model_control_key=KEY) as running:
        yield Client(running)


def repository_call(client: Client, path: str, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{client.server.http_url}/v2/repository{path}", headers=CLOSE_CONNECTION | (headers or {}), timeout=30)


@pytest.mark.parametrize("headers", [None, {HEADER: "wrong"}, {"triton-disagg-other": KEY}], ids=["none", "wrong", "other-header"])
@pytest.mark.parametrize("path", ["/index", "/models/decode_0/unload", "/models/decode_7/load"])
def test_the_repository_api_is_refused_without_the_key(restricted, path, headers):
    response = repository_call(restricted, path, headers)
    assert response.status_code == 403, response.text
    assert response.json() == {"error": f"This API is restricted, expecting header '{HEADER}'"}


def test_grpc_repository_api_needs_the_key_too(restricted):
    grpc = grpcclient.InferenceServerClient(restricted.server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="This protocol is restricted"):
            grpc.get_model_repository_index()
        index = grpc.get_model_repository_index(headers={f"triton-grpc-protocol-{HEADER}": KEY})
    finally:
        grpc.close()
    assert {m.name for m in index.models if m.state == "READY"} >= {"llm", "router", "kv_transfer", "decode_0"}


def test_with_the_key_the_index_lists_the_workers_the_launcher_loaded(restricted):
    assert restricted.server.model_control_headers == {HEADER: KEY}
    response = repository_call(restricted, "/index", restricted.server.model_control_headers)
    assert response.status_code == 200, response.text
    ready = sorted(m["name"] for m in response.json() if m.get("state") == "READY")
    assert ready == ["decode_0", "kv_transfer", "llm", "router"]


def test_a_request_through_llm_reaches_the_worker_the_router_saw(restricted):
    result = restricted.generate(text_input="behind a key", max_tokens=3, return_num_output_tokens=True)
    assert (result["finish_reason"], result["num_output_tokens"]) == ("length", 3)
    assert restricted.metric("triton_disagg_requests_total").get("decode_0", 0) >= 1


def test_the_planner_connector_without_the_key_is_refused(restricted):
    server = restricted.server
    connector = TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository")
    with pytest.raises(InferenceServerException, match="restricted"):
        connector.workers("decode")


def test_the_planner_connector_with_the_key_adds_and_removes_a_decode_worker(restricted):
    server = restricted.server
    headers = PlanSettings(api_key_header=f"{HEADER}={KEY}").headers  # as `triton-disagg plan --api-key-header`
    connector = TritonConnector(server.http_url, server.metrics_url, Path(server.run_dir) / "model_repository", headers)
    assert connector.workers("decode") == ["decode_0"]

    assert connector.add_worker("decode") == "decode_1"
    assert connector.workers("decode") == ["decode_0", "decode_1"]
    time.sleep(1.5)  # the router polls the repository index every second, with the key it inherited
    before = restricted.metric("triton_disagg_requests_total", missing_ok=True)
    for i in range(4):
        restricted.generate(text_input=f"spread me {i}", max_tokens=2, routing_mode="round_robin")
    after = restricted.metric("triton_disagg_requests_total")
    assert after.get("decode_1", 0) - before.get("decode_1", 0) == 2

    assert connector.remove_worker("decode") == "decode_1"
    assert connector.workers("decode") == ["decode_0"]
    assert restricted.generate(text_input="after the unload", max_tokens=2)["finish_reason"] == "length"


def test_the_key_is_in_no_log_and_no_model_config(restricted):
    """The router and the KV directory get the key from the environment, never as a model parameter."""
    assert KEY not in Path(restricted.server.log_path).read_text(errors="replace")
    for model in ("router", "kv_transfer", "llm", "decode_0"):
        response = requests.get(f"{restricted.server.http_url}/v2/models/{model}/config", headers=CLOSE_CONNECTION, timeout=30)
        assert response.status_code == 200 and KEY not in response.text
