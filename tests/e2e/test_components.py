"""A deployment run part by part, as its Kubernetes pods run it: `serve --deployment FILE --component entry`
(the entry server and the frontend) and one `--component MODEL/POOL --worker-id N` process per worker,
each its own Triton server on its own address. The workers start first and join the entry once it is up;
the decode worker listens on every address and advertises 127.0.0.3, as a pod advertises its IP."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
import requests
import yaml

from tests.e2e.conftest import MIN_REMOTE_TOKENS, start_serve, wait_until_served
from tests.e2e.test_disagg import SHARED_PREFIX, greedy
from tests.e2e.test_multi_server import _can_bind
from triton_disagg.launch.server import free_ports

pytestmark = pytest.mark.e2e

def test_entry_and_worker_components_serve_a_disaggregated_request_exactly(tmp_path, model_path, client):
    if not all(_can_bind(address) for address in ("127.0.0.2", "127.0.0.3")):
        pytest.skip("this machine cannot bind 127.0.0.2 and 127.0.0.3")
    ports = iter(free_ports(10))
    servers = [
        {"name": name, "address": address, "http_port": next(ports), "grpc_port": next(ports), "metrics_port": next(ports)}
        for name, address in (("entry", "127.0.0.1"), ("prefill", "127.0.0.2"), ("decode", "0.0.0.0"))
    ]
    frontend_port = next(ports)
    spec = {
        "name": "pods",
        "servers": servers,
        "frontend": {"server": "entry", "host": "127.0.0.1", "port": frontend_port},
        "models": [
            {
                "name": "tiny-llama",
                "path": str(model_path),
                "llm_instances": 1,
                "router": {"min_remote_prefill_tokens": MIN_REMOTE_TOKENS},
                "pools": [
                    {"role": "prefill", "server": "prefill", "replicas": {"min": 1, "max": 2, "initial": 1}},
                    {"role": "decode", "server": "decode", "replicas": {"min": 1, "max": 2, "initial": 1}, "kv": {"num_blocks": 256}},
                ],
            }
        ],
    }
    spec_path = tmp_path / "deploy.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    logs = {part: tmp_path / f"{part}.log" for part in ("decode", "prefill", "entry")}
    processes = {
        "decode": start_serve(spec_path, logs["decode"], "--component", "tiny-llama/decode", "--worker-id", "0",
                         "--entry-host", "127.0.0.1", "--advertise-host", "127.0.0.3", "--run-dir", str(tmp_path / "decode")),
        "prefill": start_serve(spec_path, logs["prefill"], "--component", "tiny-llama/prefill", "--worker-id", "0",
                          "--entry-host", "127.0.0.1", "--run-dir", str(tmp_path / "prefill")),
    }  # fmt: skip
    time.sleep(5)  # the workers come up first and wait for the entry, as pods may
    processes["entry"] = start_serve(spec_path, logs["entry"], "--component", "entry", "--run-dir", str(tmp_path / "entry"))
    try:
        for part, log_path in logs.items():
            wait_until_served(processes[part], log_path, 400)
        frontend = f"http://127.0.0.1:{frontend_port}"
        deadline_s = time.monotonic() + 60
        while requests.get(f"{frontend}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline_s, "the frontend never turned ready"
            time.sleep(0.5)
        prompt = SHARED_PREFIX + "across pods"
        body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        completion = requests.post(f"{frontend}/v1/completions", json=body, timeout=120).json()
        assert completion["choices"][0]["text"] == greedy(client, prompt)  # the single-server path
        # The prompt was prefilled by the prefill pod and its KV pulled by the decode pod, over NIXL.
        decode_metrics = requests.get(f"http://127.0.0.3:{servers[2]['metrics_port']}/metrics", timeout=10).text
        done = re.search(r'^triton_disagg_kv_pulls_total\{[^}]*outcome="done"[^}]*\} (\S+)$', decode_metrics, re.MULTILINE)
        assert done and float(done.group(1)) >= 1, decode_metrics
    finally:
        for process in processes.values():
            os.killpg(process.pid, signal.SIGTERM)
        codes = {part: process.wait(timeout=120) for part, process in processes.items()}
    assert codes == {"decode": 0, "prefill": 0, "entry": 0}, {part: logs[part].read_text()[-2000:] for part in logs}
