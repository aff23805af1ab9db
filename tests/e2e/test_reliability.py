"""Faults on a real server: readiness at start, workers killed (SIGKILL of their stub) or unloaded under
requests, a prefill worker killed mid-handoff, and no routable worker at all.

One server for the module: one prefill and two decode workers. Its fixture fires requests the moment
Triton's readiness turns 200, while the launcher is still waiting, which is the race a probe or a
load generator runs into.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import CLOSE_CONNECTION, MIN_REMOTE_TOKENS, Client, _start
from triton_disagg.frontend.config import FrontendConfig
from triton_disagg.launch.frontend import FrontendProcess
from triton_disagg.launch.server import free_ports
from triton_disagg.launch.supervisor import StubSupervisor, stubs
from triton_disagg.model_control import ModelControl, router_action
from triton_disagg.tools.faults import kill_worker
from triton_disagg.tools.soak import SoakSettings, SoakTarget, run_soak

pytestmark = pytest.mark.e2e

#: Requests fired the moment /v2/health/ready first answers 200.
NUM_RACE_REQUESTS = 8
#: Long enough that a kill lands mid-stream, short enough for a loaded 2-core machine.
STREAM_TOKENS = 160
PREFIX = "Every token of this stream must arrive exactly once. "


class ReadinessRace:
    """Polls readiness from the server's start; the moment it is 200, fires requests. Records their answers."""

    def __init__(self, http_url: str) -> None:
        self.http_url = http_url
        self.answers: list[tuple[int, str]] = []
        self.ready_at_s: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if requests.get(f"{self.http_url}/v2/health/ready", timeout=1, headers=CLOSE_CONNECTION).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.02)
        else:
            return
        self.ready_at_s = time.monotonic()
        with ThreadPoolExecutor(NUM_RACE_REQUESTS) as pool:
            self.answers = list(pool.map(self._generate, range(NUM_RACE_REQUESTS)))

    def _generate(self, i: int) -> tuple[int, str]:
        body = {"text_input": f"the moment it is ready {i}", "max_tokens": 4}
        response = requests.post(f"{self.http_url}/v2/models/llm/generate", json=body, headers=CLOSE_CONNECTION, timeout=120)
        return response.status_code, response.text


@pytest.fixture(scope="module")
def race_and_server(tmp_path_factory, model_path):
    server = _start(
        tmp_path_factory,
        model_path,
        prefill_workers=1,
        decode_workers=2,
        min_remote_prefill_tokens=MIN_REMOTE_TOKENS,
        kv_hold_timeout_s=5.0,
        kv_pull_timeout_s=5.0,
        route_wait_s=3.0,
    )
    server.start()
    try:
        race = ReadinessRace(server.http_url)
        race.start()
        server.wait_ready()
        race.join(timeout_s=120)
        yield race, Client(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def faulty(race_and_server) -> Client:
    return race_and_server[1]


def test_requests_sent_the_moment_triton_reports_ready_are_served(race_and_server):
    race, _ = race_and_server
    assert race.ready_at_s is not None, "readiness never turned 200"
    assert len(race.answers) == NUM_RACE_REQUESTS
    statuses = [status for status, _ in race.answers]
    assert statuses == [200] * NUM_RACE_REQUESTS, race.answers
    assert all(json.loads(text)["finish_reason"] == "length" for _, text in race.answers)


def stream_text(client: Client, prompt: str, started: threading.Event | None = None, **body) -> tuple[str, int]:
    """A streamed request's text, concatenated in order, and its last num_output_tokens."""
    url = f"{client.server.http_url}/v2/models/llm/generate_stream"
    body = {"text_input": prompt, "max_tokens": STREAM_TOKENS, "ignore_eos": True, "stream": True,
            "exclude_input_in_output": True, "return_num_output_tokens": True, **body}  # fmt: skip
    parts, num_output_tokens = [], 0
    with requests.post(url, json=body, headers=CLOSE_CONNECTION, stream=True, timeout=180) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[len(b"data: ") :])
            assert "error" not in event, event
            parts.append(event["text_output"])
            num_output_tokens = event["num_output_tokens"]
            if started is not None and num_output_tokens >= 8:
                started.set()
    return "".join(parts), num_output_tokens


def reference(client: Client, prompts: list[str]) -> list[str]:
    """Each prompt's greedy output, uninterrupted."""
    return [stream_text(client, p)[0] for p in prompts]


def llm_counter(client: Client, name: str) -> int:
    return sum(client.metric(name, missing_ok=True).values())


def wait_for(condition, timeout_s: float = 60.0, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() > deadline:
            return value
        time.sleep(interval_s)
    return value


def directory_agents(client: Client) -> list[str]:
    """The KV directory's agent names, e.g. ["decode_0-1a2b3c4d", ...]."""
    body = {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["list"]}]}
    response = requests.post(f"{client.server.http_url}/v2/models/kv_transfer/infer", json=body, headers=CLOSE_CONNECTION, timeout=30)
    assert response.status_code == 200, response.text
    return sorted(next(o["data"] for o in response.json()["outputs"] if o["name"] == "agent_names"))


def interrupted_streams(client: Client, prompts: list[str], fault) -> list[tuple[str, int]]:
    """Stream every prompt (round-robin over the decode workers); once all are streaming, run `fault()`."""
    started = [threading.Event() for _ in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        jobs = [pool.submit(stream_text, client, p, s, routing_mode="round_robin") for p, s in zip(prompts, started)]
        assert all(s.wait(120) for s in started)
        fault()
        return [job.result() for job in jobs]


def reload(client: Client, name: str, unload_first: bool = True) -> None:
    """Load `name` afresh. A killed worker is loaded over (not unloaded first): Triton cannot finish its
    unload, because the requests that were in flight on the dead stub are never released."""
    control = ModelControl(client.server.http_url)
    try:
        if unload_first:
            control.unload(name)
        control.load_worker(Path(client.server.run_dir) / "model_repository", name.rsplit("_", 1)[0], name)
    finally:
        control.close()
    # Routable again once the router has resynchronised with the new worker's KV events.
    assert wait_for(lambda: routable_decode_workers(client) == 2, 30)


def routable_decode_workers(client: Client) -> int:
    body = {"inputs": [{"name": "action", "shape": [1], "datatype": "BYTES", "data": ["status"]}]}
    response = requests.post(f"{client.server.http_url}/v2/models/router/infer", json=body, headers=CLOSE_CONNECTION, timeout=30)
    assert response.status_code == 200, response.text
    return next(o["data"][0] for o in response.json()["outputs"] if o["name"] == "num_routable_decode")


def test_a_decode_worker_killed_mid_stream_hands_its_requests_over_token_exact(faulty):
    prompts = [f"{PREFIX}{i} " * 2 for i in range(4)]
    expected = reference(faulty, prompts)
    migrations = llm_counter(faulty, "triton_disagg_llm_migrations_total")
    outputs = interrupted_streams(faulty, prompts, lambda: kill_worker(faulty.server.run_dir, "decode_0"))
    assert [text for text, _ in outputs] == expected
    assert [n for _, n in outputs] == [STREAM_TOKENS] * len(prompts)
    assert wait_for(lambda: llm_counter(faulty, "triton_disagg_llm_migrations_total") - migrations >= 1, 10)
    # The router routes around the dead worker at once: every later request is served by decode_1.
    assert routable_decode_workers(faulty) == 1
    for i in range(4):
        assert faulty.generate(text_input=f"after the kill {i}", max_tokens=3, routing_mode="round_robin")["finish_reason"] == "length"
    assert not [a for a in directory_agents(faulty) if a.startswith("decode_0-")]
    reload(faulty, "decode_0", unload_first=False)
    for i in range(2):  # a worker registers its agent with its first request
        faulty.generate(text_input=f"after the reload {i}", max_tokens=2, routing_mode="round_robin")
    assert [a for a in directory_agents(faulty) if a.startswith("decode_0-")]


def test_unloading_a_decode_worker_under_requests_moves_them(faulty):
    prompts = [f"{PREFIX}unload {i} " * 2 for i in range(4)]
    expected = reference(faulty, prompts)
    (old_agent,) = [a for a in directory_agents(faulty) if a.startswith("decode_1-")]
    control = ModelControl(faulty.server.http_url)
    try:
        outputs = interrupted_streams(faulty, prompts, lambda: control.unload("decode_1"))
    finally:
        control.close()
    assert [text for text, _ in outputs] == expected
    # The unloaded worker's KV directory entry goes within the directory's next index poll.
    assert wait_for(lambda: old_agent not in directory_agents(faulty), 10)
    reload(faulty, "decode_1")


def test_a_prefill_worker_killed_mid_handoff_leaves_decode_to_recompute(faulty):
    prompts = [f"{PREFIX}A long prompt prefilled remotely, number {i}. " * 2 for i in range(6)]
    assert all(len(p) >= MIN_REMOTE_TOKENS for p in prompts)
    expected = reference(faulty, prompts)

    def kill_prefill():
        kill_worker(faulty.server.run_dir, "prefill_0")

    with ThreadPoolExecutor(len(prompts)) as pool:
        jobs = [pool.submit(stream_text, faulty, p, max_tokens=24) for p in prompts]
        time.sleep(0.2)  # some in their prefill or KV pull, some not sent yet
        kill_prefill()
        outputs = [job.result()[0] for job in jobs]
    assert outputs == [e[: len(o)] for e, o in zip(expected, outputs)]  # 24 of the reference's tokens
    assert all(len(o) > 0 for o in outputs)
    reload(faulty, "prefill_0", unload_first=False)
    assert stream_text(faulty, prompts[0], max_tokens=24)[0] == outputs[0]


def test_with_no_routable_worker_a_request_waits_then_gets_unavailable(faulty):
    url = faulty.server.http_url
    for name in ("decode_0", "decode_1"):
        router_action(url, "drain", name)
    try:
        started_s = time.monotonic()
        response = faulty.post_generate(text_input="nobody home", max_tokens=2)
        waited_s = time.monotonic() - started_s
        # Triton's HTTP generate answers every model error with 400; the text says it is the server's.
        assert response.json()["error"].startswith("unavailable (all_workers_draining): "), response.text
        assert waited_s >= 3.0  # route_wait_s of this server
        # A request that arrives while none is routable is served once one is, within the wait.
        with ThreadPoolExecutor(1) as pool:
            job = pool.submit(faulty.generate, text_input="patience", max_tokens=2)
            time.sleep(1.0)
            router_action(url, "undrain", "decode_0")
            assert job.result()["finish_reason"] == "length"
    finally:
        for name in ("decode_0", "decode_1"):
            router_action(url, "undrain", name)


@pytest.mark.parametrize("fault", ["kill", "unload"])
def test_a_short_soak_loses_no_request_and_leaks_no_block(faulty, fault):
    """Four streams for 24 s with cancellations, disconnects, and decode_0 taken away under load at 8 s:
    its stub killed (then loaded again by the stub supervisor, as `serve` runs it), or unloaded through
    model control (then loaded again at 16 s). No stub may crash, at work (see serving.model_calls) or
    on its way out (see serving.triton_io.finalize_service), and the unload must complete: a gRPC
    stream cancelled as its request completed once left Triton's stream state, and so the worker, held
    forever (UNLOADING)."""
    server = faulty.server
    target = SoakTarget(server.http_url, server.grpc_url, server.metrics_url, server.run_dir, server.pid)
    report = run_soak(target, SoakSettings(streams=4, duration_s=24.0, max_tokens=(8, 40), fault=fault))
    assert report.failures == []
    assert (report.lost, report.server_errors, report.crashed_stubs, report.stub_faults) == (0, 0, [], 0)
    assert report.completed > 0 and report.cancelled > 0
    assert report.leaked_blocks and not any(report.leaked_blocks.values()), report.leaked_blocks
    assert wait_for(lambda: routable_decode_workers(faulty) == 2, 30)


def test_the_frontend_is_ready_only_while_a_worker_is_routable_and_answers_503_with_retry_after(faulty, tmp_path_factory, model_path):
    (port,) = free_ports(1)
    config = FrontendConfig(triton_url=faulty.server.grpc_url, host="127.0.0.1", port=port)
    url = faulty.server.http_url
    with FrontendProcess(config, tmp_path_factory.mktemp("frontend") / "frontend.log") as frontend:
        assert requests.get(f"{frontend.url}/health", timeout=10).status_code == 200
        for name in ("decode_0", "decode_1"):
            router_action(url, "drain", name)
        try:
            health = requests.get(f"{frontend.url}/health", timeout=10)
            assert (health.status_code, health.headers.get("Retry-After")) == (503, "1")
            assert "no decode worker is routable" in health.json()["detail"]
            body = {"model": model_path.resolve().name, "prompt": "anyone?", "max_tokens": 2}
            response = requests.post(f"{frontend.url}/v1/completions", json=body, timeout=60)
            assert (response.status_code, response.headers.get("Retry-After")) == (503, "1"), response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "all_workers_draining")
        finally:
            for name in ("decode_0", "decode_1"):
                router_action(url, "undrain", name)
        assert requests.get(f"{frontend.url}/health", timeout=10).status_code == 200


def test_the_supervisor_loads_again_a_model_whose_stub_died(faulty):
    """Triton 2.51 keeps a model with a dead stub READY and refuses every request given to that instance."""
    server = faulty.server
    supervisor = StubSupervisor(server.http_url, server.run_dir)
    try:
        assert supervisor.check() == []
        (llm_stub, *_) = [pid for pid, model in stubs(server.run_dir).items() if model == "llm"]
        os.kill(llm_stub, signal.SIGKILL)
        kill_worker(server.run_dir, "decode_1")
        assert wait_for(lambda: llm_stub not in stubs(server.run_dir), 10)
        assert supervisor.check() == ["decode_1", "llm"]
        # Two new llm stubs; the old model's live one stays until the old model is released (never: the
        # dead instance's requests are never released).
        running = list(stubs(server.run_dir).values())
        assert running.count("llm") >= 2 and running.count("decode_1") == 1
        # Without the reload, every request Triton gave the dead llm instance would be refused.
        for i in range(8):
            assert faulty.generate(text_input=f"healed {i}", max_tokens=3, routing_mode="round_robin")["finish_reason"] == "length"
        assert supervisor.check() == []
    finally:
        supervisor.close()
