"""One real Triton server for the whole end-to-end session, on the default model and free ports."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from triton_disagg.checkpoint import make_model
from triton_disagg.launch.server import ServerConfig, TritonServer, free_ports
from triton_disagg.model_control import ModelControl

#: Small enough that a leak shows, large enough for 16 concurrent requests.
NUM_BLOCKS = 256
#: Threads share one Client, so no connection is kept between calls (nor left open at shutdown).
CLOSE_CONNECTION = {"Connection": "close"}


#: The disaggregated server prefills prompts with at least this many uncached tokens remotely.
MIN_REMOTE_TOKENS = 48


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def _start(tmp_path_factory, model_path, **overrides) -> TritonServer:
    http_port, grpc_port, metrics_port = free_ports(3)
    config = ServerConfig(
        **{
            "model_path": model_path,
            "run_dir": tmp_path_factory.mktemp("run"),
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "num_blocks": NUM_BLOCKS,
            "exit_timeout_s": 2,
        }
        | overrides
    )
    return TritonServer(config)


@pytest.fixture(scope="session")
def server(tmp_path_factory, model_path) -> Iterator[TritonServer]:
    """One prefill and one decode worker; prompts this suite sends are all prefilled on the decode worker."""
    with _start(tmp_path_factory, model_path) as running:
        yield running


@pytest.fixture(scope="session")
def two_decoders(tmp_path_factory, model_path) -> Iterator["Client"]:
    """Two decode workers and no prefill worker, behind the KV router."""
    with _start(tmp_path_factory, model_path, prefill_workers=0, decode_workers=2) as running:
        yield Client(running)


@pytest.fixture(scope="session")
def _one_decoder_server(tmp_path_factory, model_path) -> Iterator["Client"]:
    with _start(tmp_path_factory, model_path, prefill_workers=0, decode_workers=1) as running:
        yield Client(running)


@pytest.fixture
def one_decoder(_one_decoder_server) -> Iterator["Client"]:
    """One decode worker and no prefill worker: a pool for the planner's connector to grow and shrink.

    Each test gets the pool back as it was: a worker a failed test left loaded is unloaded after it,
    so one failure does not turn into failures of the tests after it.
    """
    yield _one_decoder_server
    control = ModelControl(_one_decoder_server.server.http_url)
    try:
        for name in control.ready_models():
            if re.fullmatch(r"(prefill|decode)_\d+", name) and name != "decode_0":
                control.unload(name)
    finally:
        control.close()


@pytest.fixture(scope="session")
def disagg(tmp_path_factory, model_path) -> Iterator["Client"]:
    """A second server whose decode worker has prompts of MIN_REMOTE_TOKENS or more prefilled remotely."""
    with _start(tmp_path_factory, model_path, min_remote_prefill_tokens=MIN_REMOTE_TOKENS, kv_hold_timeout_s=5.0) as running:
        yield Client(running)


class Client:
    """The `llm` model through HTTP generate and gRPC streaming, and the worker's KV gauges."""

    def __init__(self, server: TritonServer) -> None:
        self.server = server

    def post_generate(self, **body) -> requests.Response:
        url = f"{self.server.http_url}/v2/models/llm/generate"
        return requests.post(url, json=body, headers=CLOSE_CONNECTION, timeout=60)

    def generate(self, **body) -> dict:
        response = self.post_generate(**body)
        assert response.status_code == 200, response.text
        return response.json()

    def generate_stream(self, **body) -> list[dict]:
        """Every event of a streamed request, in order."""
        url = f"{self.server.http_url}/v2/models/llm/generate_stream"
        with requests.post(
            url, json={"stream": True, **body}, headers=CLOSE_CONNECTION, stream=True, timeout=60
        ) as response:
            assert response.status_code == 200, response.text
            return [json.loads(line[len(b"data: ") :]) for line in response.iter_lines() if line.startswith(b"data: ")]

    def grpc_stream(self, inputs: dict[str, np.ndarray], *, cancel_after: int | None = None, model: str = "llm") -> list:
        """Send one request over a gRPC stream; return its responses (InferResult, or the error that ended it).

        With `cancel_after`, cancel the request after that many responses.
        """
        received: queue.Queue = queue.Queue()
        grpc = grpcclient.InferenceServerClient(self.server.grpc_url)
        grpc.start_stream(callback=lambda result, error: received.put(error or result))
        tensors = []
        for name, array in inputs.items():
            tensors.append(grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
        responses = []
        try:
            grpc.async_stream_infer(model, tensors, enable_empty_final_response=True)
            while cancel_after is None or len(responses) < cancel_after:
                responses.append(received.get(timeout=30))
                if not isinstance(responses[-1], grpcclient.InferResult) or _is_final(responses[-1]):
                    break
        finally:
            grpc.stop_stream(cancel_requests=cancel_after is not None)
            grpc.close()
        return responses

    def free_blocks(self) -> dict[str, int]:
        """Free KV blocks of every worker, by model name."""
        return self.metric("triton_disagg_kv_free_blocks")

    def total_blocks(self) -> dict[str, int]:
        return self.metric("triton_disagg_kv_blocks")

    def metric(self, name: str, missing_ok: bool = False, **labels: str) -> dict[str, int]:
        """Values of metric `name` by `model` label, among series that carry `labels`."""
        metrics = requests.get(self.server.metrics_url, headers=CLOSE_CONNECTION, timeout=10).text
        values = {}
        for label_text, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", metrics, re.MULTILINE):
            series = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if all(series.get(k) == v for k, v in labels.items()):
                values[series["model"]] = int(float(value))
        assert values or missing_ok, f"{name} {labels} is missing from the metrics"
        return values


@pytest.fixture
def client(server) -> Client:
    return Client(server)


def _is_final(result: grpcclient.InferResult) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


#: What `serve` prints once everything it started is ready.
SERVE_READY = "Ctrl-C stops the server."


def start_serve(spec_path: Path, log_path: Path, *args: str) -> subprocess.Popen:
    """`triton-disagg serve --deployment spec_path ARGS` in its own session, its output in `log_path`."""
    command = [sys.executable, "-m", "triton_disagg.cli.main", "serve", "--deployment", str(spec_path), *args]
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until_served(process: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    """Wait until `serve` says it is ready; its output so far. Fails with the output if it exits or times out."""
    deadline_s = time.monotonic() + timeout_s
    while SERVE_READY not in (out := log_path.read_text()):
        assert process.poll() is None, out
        assert time.monotonic() < deadline_s, out
        time.sleep(0.5)
    return out
