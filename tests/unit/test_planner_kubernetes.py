"""The planner's Kubernetes connector against a local stand-in of the Kubernetes API (tests/conftest.py).

The entry server's router and a worker's metrics page are a small HTTP stand-in
here too (its drain, inflight and undrain actions and the idle gauges); the
end-to-end test (tests/e2e/test_kubernetes_scaling.py) runs the connector
against a real Triton server.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from triton_disagg.cli.plan import PlanSettings, build_planner_loop
from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.kubernetes import KubernetesConnector, Workload, api_client

IDLE_PAGE = "".join(
    f'{gauge}{{model="{name}"}} 0\n'
    for gauge in ("triton_disagg_running_requests", "triton_disagg_waiting_requests", "triton_disagg_kv_held_blocks")
    for name in ("decode_0", "decode_1", "decode_2", "prefill_0")
)


class FakeEntry:
    """The router's drain/undrain/inflight actions and a metrics page; `actions` logs (action, worker) in order.

    `inflight[name]` requests are on a worker; each `inflight` query finishes one of them
    unless `stuck` is set, so a drain waits a few polls and then sees the worker idle.
    """

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}
        self.stuck = False
        self.actions: list[tuple[str, str]] = []
        self.known = {"decode_0", "decode_1", "decode_2", "prefill_0"}

    def infer(self, action: str, name: str) -> tuple[int, dict]:
        self.actions.append((action, name))
        if action == "drain" and name not in self.known:
            return 400, {"error": f"worker_name {name!r} is not a live prefill or decode worker"}
        outputs = []
        if action == "inflight":
            num = self.inflight.get(name, 0)
            if num and not self.stuck:
                self.inflight[name] = num - 1
            outputs = [{"name": "num_inflight", "datatype": "INT32", "shape": [1], "data": [num]}]
        return 200, {"model_name": "router", "outputs": outputs}


@pytest.fixture
def entry():
    fake = FakeEntry()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            values = {i["name"]: i["data"][0] for i in body["inputs"]}
            code, payload = fake.infer(values["action"], values["worker_name"])
            self._send(code, json.dumps(payload))

        def do_GET(self):
            fake.actions.append(("metrics", self.path))
            self._send(200, IDLE_PAGE)

        def _send(self, code, text):
            data = text.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join()


def make_connector(fake_kubernetes, entry, **overrides) -> KubernetesConnector:
    fake_kubernetes.add("tiny-decode", 2)
    settings = {
        "workloads": {"decode": Workload("statefulset", "tiny-decode")},
        "namespace": fake_kubernetes.namespace,
        "router_http_url": entry.url,
        "worker_metrics_url": entry.url + "/metrics/{workload}/{ordinal}/{name}",
        "client": api_client(fake_kubernetes.url),
        "poll_s": 0.01,
    }
    return KubernetesConnector(**(settings | overrides))


def test_workers_are_the_ordinals_of_the_statefulset(fake_kubernetes, entry):
    connector = make_connector(fake_kubernetes, entry)
    assert connector.workers("decode") == ["decode_0", "decode_1"]
    assert connector.workers("prefill") == []  # no workload: an aggregated deployment


def test_a_worker_is_drained_until_idle_before_its_replica_goes(fake_kubernetes, entry):
    """decode_1 (the highest ordinal) holds 2 requests: the router is asked to drain it, counts 2, 1, 0,
    the metrics page of decode_1's pod shows it idle, and only then is spec.replicas lowered to 1."""
    connector = make_connector(fake_kubernetes, entry)
    entry.inflight["decode_1"] = 2
    assert connector.remove_worker("decode") == "decode_1"
    assert entry.actions == [
        ("drain", "decode_1"),
        ("inflight", "decode_1"),
        ("inflight", "decode_1"),
        ("inflight", "decode_1"),
        ("metrics", "/metrics/tiny-decode/1/decode_1"),
    ]
    assert fake_kubernetes.patches() == [("tiny-decode", 1)]
    patch = next(r for r in fake_kubernetes.requests if r[0] == "PATCH")
    assert patch[1] == "/apis/apps/v1/namespaces/llm/statefulsets/tiny-decode/scale"
    assert patch[2] == "application/merge-patch+json"
    assert connector.workers("decode") == ["decode_0"]


def test_a_drain_that_times_out_is_called_off_and_the_replicas_stay(fake_kubernetes, entry):
    connector = make_connector(fake_kubernetes, entry, drain_timeout_s=0.1)
    entry.inflight["decode_1"] = 1
    entry.stuck = True
    with pytest.raises(TimeoutError, match="decode_1 was not idle after 0.1 s of draining: the router counts 1 requests"):
        connector.remove_worker("decode")
    assert entry.actions[0] == ("drain", "decode_1") and entry.actions[-1] == ("undrain", "decode_1")
    assert fake_kubernetes.patches() == []
    assert connector.workers("decode") == ["decode_0", "decode_1"]


def test_a_worker_the_router_does_not_know_is_not_scaled_away(fake_kubernetes, entry):
    connector = make_connector(fake_kubernetes, entry)
    entry.known.discard("decode_1")
    with pytest.raises(RuntimeError, match="is not a live prefill or decode worker"):
        connector.remove_worker("decode")
    assert fake_kubernetes.patches() == []


def test_adding_a_worker_waits_for_its_pod_to_be_ready(fake_kubernetes, entry):
    """The stand-in controller makes the new pod ready on the third status read."""
    reads = []

    def slow_controller(api, name, old, new):
        api.workloads[name].ready = old  # not ready yet

    fake_kubernetes.controller = slow_controller
    connector = make_connector(fake_kubernetes, entry)
    original = connector._ready_replicas

    def counting_ready(pool):
        reads.append(pool)
        if len(reads) == 3:
            fake_kubernetes.workloads["tiny-decode"].ready = 3
        return original(pool)

    connector._ready_replicas = counting_ready
    assert connector.add_worker("decode") == "decode_2"
    assert len(reads) == 3
    assert fake_kubernetes.patches() == [("tiny-decode", 3)]
    assert entry.actions == [("undrain", "decode_2")]
    assert connector.workers("decode") == ["decode_0", "decode_1", "decode_2"]


def test_a_worker_never_ready_is_scaled_away_again(fake_kubernetes, entry):
    fake_kubernetes.controller = lambda api, name, old, new: None  # pods never become ready
    connector = make_connector(fake_kubernetes, entry, ready_timeout_s=0.1)
    with pytest.raises(TimeoutError, match="decode_2 was not ready 0.1 s after scaling up; scaled back"):
        connector.add_worker("decode")
    assert fake_kubernetes.patches() == [("tiny-decode", 3), ("tiny-decode", 2)]


def test_a_leader_worker_set_is_scaled_through_its_custom_scale_subresource(fake_kubernetes, entry):
    fake_kubernetes.add("big-decode", 1, kind="leaderworkerset")
    connector = make_connector(fake_kubernetes, entry, workloads={"decode": Workload("leaderworkerset", "big-decode")})
    assert connector.add_worker("decode") == "decode_1"
    assert connector.remove_worker("decode") == "decode_1"
    assert fake_kubernetes.patches() == [("big-decode", 2), ("big-decode", 1)]
    paths = {r[1] for r in fake_kubernetes.requests if r[0] == "PATCH"}
    assert paths == {"/apis/leaderworkerset.x-k8s.io/v1/namespaces/llm/leaderworkersets/big-decode/scale"}


def test_the_stand_in_refuses_what_the_api_server_refuses(fake_kubernetes):
    """Custom resources (LeaderWorkerSet) take no strategic-merge patch, the client's default for a dict
    body: the connector sends a merge patch to both kinds. Unknown workloads are 404."""
    fake_kubernetes.add("big-decode", 1, kind="leaderworkerset")
    custom = k8s.CustomObjectsApi(api_client(fake_kubernetes.url))
    body = {"spec": {"replicas": 2}}
    with pytest.raises(ApiException) as refused:
        custom.patch_namespaced_custom_object_scale(
            "leaderworkerset.x-k8s.io", "v1", "llm", "leaderworkersets", "big-decode", body,
            _content_type="application/strategic-merge-patch+json",
        )  # fmt: skip
    assert refused.value.status == 415
    apps = k8s.AppsV1Api(api_client(fake_kubernetes.url))
    with pytest.raises(ApiException) as missing:
        apps.read_namespaced_stateful_set_scale("other", "llm")
    assert missing.value.status == 404


@pytest.mark.parametrize("text", ["decode", "deployment/x", "statefulset/Bad_Name", "statefulset/"])
def test_a_bad_workload_is_refused(text):
    with pytest.raises(ValueError, match="must be statefulset/NAME or leaderworkerset/NAME"):
        Workload.parse(text)


def test_plan_builds_a_kubernetes_planner_without_a_device_inventory(fake_kubernetes, entry):
    """Pool bounds and devices per worker come from flags; the scheduler places pods, so no inventory."""
    fake_kubernetes.add("tiny-prefill", 1)
    fake_kubernetes.add("tiny-decode", 2)
    settings = PlanSettings(
        http_url=entry.url,
        connector="kubernetes",
        namespace="llm",
        kube_api_url=fake_kubernetes.url,
        prefill_workload="statefulset/tiny-prefill",
        decode_workload="statefulset/tiny-decode",
    )
    config = PlannerConfig(policy="load", devices_per_decode_worker=2, max_decode_workers=4, device_budget=16)
    loop = build_planner_loop(settings, config, fetch_metrics=lambda: IDLE_PAGE)
    assert loop.inventory is None
    assert {pool: loop.connector.workers(pool) for pool in ("prefill", "decode")} == {
        "prefill": ["prefill_0"],
        "decode": ["decode_0", "decode_1"],
    }
    with pytest.raises(ValueError, match="needs --decode-workload"):
        build_planner_loop(PlanSettings(connector="kubernetes", kube_api_url=fake_kubernetes.url), config, lambda: "")
