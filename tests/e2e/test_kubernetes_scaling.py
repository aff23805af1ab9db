"""The Kubernetes connector scales a real server's decode pool and loses no request on the way down.

No cluster runs here. The stand-in API (tests/conftest.py) plays the
StatefulSet controller against the session's real Triton server: raising
`spec.replicas` loads the next `decode_<ordinal>` through model control and
reports it ready once it serves, lowering it unloads the highest ordinal at
once, as Kubernetes stops a pod. Requests in flight on that worker survive
only if the connector drained it before it patched the scale.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from triton_disagg.model_control import ModelControl, RouterRefused, router_action
from triton_disagg.planner.kubernetes import KubernetesConnector, Workload, api_client

pytestmark = pytest.mark.e2e


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline_s = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline_s, "condition not met in time"
        time.sleep(0.05)


def served(client, name: str) -> int:
    return client.metric("triton_disagg_requests_total", missing_ok=True).get(name, 0)


class TritonBackedController:
    """Pods as workers of one real server: a new ordinal is loaded, a removed one unloaded.

    `served_at_stop[name]` is how many requests the worker had finished when its pod was stopped.
    """

    def __init__(self, client) -> None:
        self.client = client
        self.server = client.server
        self.served_at_stop: dict[str, int] = {}
        self.threads: list[threading.Thread] = []

    def __call__(self, api, workload: str, old: int, new: int) -> None:
        for ordinal in range(new, old):  # scale down: the pod goes now
            name = f"decode_{ordinal}"
            self.served_at_stop[name] = served(self.client, name)
            control = ModelControl(self.server.http_url)
            control.unload(name)
            control.close()
            api.workloads[workload].ready = ordinal
        for ordinal in range(old, new):  # scale up: the pod starts, and is ready once it serves
            thread = threading.Thread(target=self._start_pod, args=(api, workload, ordinal))
            thread.start()
            self.threads.append(thread)

    def _start_pod(self, api, workload: str, ordinal: int) -> None:
        control = ModelControl(self.server.http_url)
        control.load_worker(Path(self.server.run_dir) / "model_repository", "decode", f"decode_{ordinal}")
        control.close()
        api.workloads[workload].ready = ordinal + 1


def test_scale_up_then_drain_before_the_pod_goes_losing_no_request(one_decoder, fake_kubernetes):
    """decode_0 is drained, so the 4 long requests all run on decode_1, the pod added by
    scaling up; scaling down must wait for all 4 before its pod is stopped."""
    server = one_decoder.server
    controller = TritonBackedController(one_decoder)
    fake_kubernetes.controller = controller
    fake_kubernetes.add("tiny-decode", 1)
    connector = KubernetesConnector(
        {"decode": Workload("statefulset", "tiny-decode")},
        fake_kubernetes.namespace,
        server.http_url,
        server.metrics_url,
        client=api_client(fake_kubernetes.url),
        poll_s=0.05,
    )
    assert connector.workers("decode") == ["decode_0"]
    assert connector.add_worker("decode") == "decode_1"
    assert connector.workers("decode") == ["decode_0", "decode_1"]

    def router_knows_decode_1() -> bool:
        try:
            router_action(server.http_url, "inflight", "decode_1")
        except RouterRefused:
            return False
        return True

    wait_until(router_knows_decode_1)
    before = served(one_decoder, "decode_1")
    router_action(server.http_url, "drain", "decode_0")
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            jobs = [
                pool.submit(one_decoder.generate, text_input=f"scaled down under load {i}", max_tokens=150, ignore_eos=True)
                for i in range(4)
            ]
            wait_until(lambda: router_action(server.http_url, "inflight", "decode_1") == 4)
            assert connector.remove_worker("decode") == "decode_1"
            results = [job.result() for job in jobs]
    finally:
        router_action(server.http_url, "undrain", "decode_0")
    assert [r["finish_reason"] for r in results] == ["length"] * 4
    assert controller.served_at_stop["decode_1"] - before == 4
    assert fake_kubernetes.patches() == [("tiny-decode", 2), ("tiny-decode", 1)]
    assert connector.workers("decode") == ["decode_0"]
    control = ModelControl(server.http_url)
    assert control.state_of("decode_1") in (None, "UNAVAILABLE")
    control.close()
    assert one_decoder.generate(text_input="after the scale down", max_tokens=2)["finish_reason"] == "length"
