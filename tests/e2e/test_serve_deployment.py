"""`triton-disagg serve --deployment FILE --model PATH` runs a spec on this machine: server, frontend and planner."""

from __future__ import annotations

import os
import re
import signal

import pytest
import requests
import yaml

from tests.e2e.conftest import start_serve, wait_until_served
from triton_disagg.launch.server import free_ports

pytestmark = pytest.mark.e2e


def test_serve_runs_the_spec_with_its_model_name_pools_and_planner(tmp_path, model_path):
    http_port, grpc_port, metrics_port, frontend_port, planner_port = free_ports(5)
    spec = {
        "name": "e2e",
        "servers": [{"name": "main", "address": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}],
        "frontend": {"host": "127.0.0.1", "port": frontend_port},
        "models": [
            {
                "name": "tiny-from-spec",
                "path": "/nonexistent/overridden-by-the-model-flag",
                "llm_instances": 1,
                "planner": {"policy": "load", "interval_s": 2, "metrics_port": planner_port},
                "pools": [{"role": "aggregated", "replicas": {"min": 1, "max": 2}, "kv": {"num_blocks": 128}}],
            }
        ],
    }
    spec_path = tmp_path / "deploy.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    log_path = tmp_path / "serve.log"
    process = start_serve(spec_path, log_path, "--model", str(model_path), "--run-dir", str(tmp_path / "run"))
    try:
        out = wait_until_served(process, log_path, 300)
        assert "workers  decode_0" in out and "prefill_" not in out
        frontend = f"http://127.0.0.1:{frontend_port}"
        assert [m["id"] for m in requests.get(f"{frontend}/v1/models", timeout=10).json()["data"]] == ["tiny-from-spec"]
        body = {"model": "tiny-from-spec", "prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "temperature": 0}
        completion = requests.post(f"{frontend}/v1/completions", json=body, timeout=60).json()
        assert completion["usage"]["completion_tokens"] == 8
        direct = requests.post(
            f"http://127.0.0.1:{http_port}/v2/models/llm/generate",
            json={"text_input": "Hello", "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True},
            timeout=60,
        ).json()
        assert completion["choices"][0]["text"] == direct["text_output"]
        # The planner manages the aggregated pool: decode workers, no prefill pool.
        planner_page = requests.get(f"http://localhost:{planner_port}/metrics", timeout=10).text
        assert re.search(r'^triton_disagg_planner_actual_workers\{pool="decode"\} 1\.0$', planner_page, re.MULTILINE)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, log_path.read_text()
