"""Two different models side by side from one deployment spec: each in its own Triton server with its own
pool and router, one OpenAI frontend listing both and routing by the request's `model`."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.e2e.conftest import start_serve, wait_until_served
from triton_disagg.checkpoint import make_model
from triton_disagg.launch.server import free_ports
from triton_disagg.model_control import ModelControl
from triton_disagg.serving.live_workers import model_control_headers

pytestmark = pytest.mark.e2e

KEY = "e2e-multi-model-key"


def _server(name: str) -> dict:
    http_port, grpc_port, metrics_port = free_ports(3)
    return {"name": name, "address": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}


def _model(name: str, path: Path, server: str | None) -> dict:
    pool = {"role": "aggregated", "replicas": {"min": 1, "max": 2, "initial": 1}, "kv": {"num_blocks": 128}}
    model = {"name": name, "path": str(path), "llm_instances": 1, "pools": [pool]}
    if server is not None:
        model["server"] = pool["server"] = server
    return model


def _routable_decode_workers(server: dict) -> int:
    """How many decode workers the router of `server` routes to."""
    body = {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["status"]}]}
    response = requests.post(f"http://127.0.0.1:{server['http_port']}/v2/models/router/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return next(o["data"][0] for o in response.json()["outputs"] if o["name"] == "num_routable_decode")


def test_two_models_from_one_spec_are_each_served_exactly_and_scaled_on_their_own(tmp_path, model_path):
    other_path = make_model(tmp_path / "tiny-mixtral", variant="moe")
    llama, mixtral = _server("llama"), _server("mixtral")
    (frontend_port,) = free_ports(1)
    spec = {
        "name": "e2e-two",
        "servers": [llama, mixtral],
        "frontend": {"host": "127.0.0.1", "port": frontend_port},
        "models": [_model("tiny-llama", model_path, None), _model("tiny-mixtral", other_path, "mixtral")],
    }
    spec_path = tmp_path / "deploy.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    log_path = tmp_path / "serve.log"
    process = start_serve(spec_path, log_path, "--run-dir", str(tmp_path / "run"), "--model-control-key", KEY)
    try:
        wait_until_served(process, log_path, 400)
        frontend = f"http://127.0.0.1:{frontend_port}"
        assert requests.get(f"{frontend}/health", timeout=10).status_code == 200
        assert [m["id"] for m in requests.get(f"{frontend}/v1/models", timeout=10).json()["data"]] == ["tiny-llama", "tiny-mixtral"]

        def through_frontend(model: str) -> str:
            body = {"model": model, "prompt": "Side by side", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
            completion = requests.post(f"{frontend}/v1/completions", json=body, timeout=60).json()
            assert completion["model"] == model and completion["usage"]["completion_tokens"] == 8, completion
            return completion["choices"][0]["text"]

        def direct(server: dict) -> str:
            body = {"text_input": "Side by side", "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True}
            return requests.post(f"http://127.0.0.1:{server['http_port']}/v2/models/llm/generate", json=body, timeout=60).json()["text_output"]

        # Each request reaches its own model's server: the text is that model's, token for token.
        texts = {name: through_frontend(name) for name in ("tiny-llama", "tiny-mixtral")}
        assert texts == {"tiny-llama": direct(llama), "tiny-mixtral": direct(mixtral)}
        assert texts["tiny-llama"] != texts["tiny-mixtral"]
        unknown = requests.post(f"{frontend}/v1/completions", json={"model": "gpt-4", "prompt": "x"}, timeout=10)
        assert unknown.status_code == 404 and "`tiny-llama`, `tiny-mixtral`" in unknown.json()["error"]["message"]

        # Scaling one model's pool leaves the other's alone: a second decode worker for tiny-mixtral only.
        control = ModelControl(f"http://127.0.0.1:{mixtral['http_port']}", model_control_headers(KEY))
        try:
            control.load_worker(tmp_path / "run" / "mixtral" / "model_repository", "decode", "decode_1")
        finally:
            control.close()
        deadline_s = time.monotonic() + 60
        while _routable_decode_workers(mixtral) != 2:
            assert time.monotonic() < deadline_s, "tiny-mixtral's router never routed to its new decode_1"
            time.sleep(0.5)
        assert _routable_decode_workers(llama) == 1
        assert through_frontend("tiny-mixtral") == texts["tiny-mixtral"]
        assert through_frontend("tiny-llama") == texts["tiny-llama"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, log_path.read_text()
