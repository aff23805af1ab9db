"""A connector that sizes pools on Kubernetes through the scale subresource of their workloads.

Each pool is one StatefulSet (or LeaderWorkerSet, when a worker spans nodes)
whose pod ordinal (group index) is the worker id: replica `j` of the decode
pool is worker `decode_j`. Growing a pool raises `spec.replicas` by one and
waits until the new pod is ready. Shrinking removes the highest ordinal, as
the StatefulSet controller does, and drains it first: the router stops
routing to it, the connector waits until the router counts no request on it
and its gauges show nothing running, waiting or held, and only then lowers
`spec.replicas`, so no request is in the pod when Kubernetes stops it.

Calls go through the official `kubernetes` client: in a pod its service
account (see the Role that `triton-disagg deploy render` writes), elsewhere
the kubeconfig, or an explicit API URL (e.g. `kubectl proxy`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import requests

from triton_disagg.planner.connectors import POOLS, is_worker_idle, wait_until_idle

#: Scale patches are JSON merge patches: custom resources (LeaderWorkerSet) take no strategic-merge patch.
MERGE_PATCH = "application/merge-patch+json"
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
WORKLOAD_KINDS = ("statefulset", "leaderworkerset")


@dataclass(slots=True, frozen=True)
class Workload:
    """A pool's workload: `statefulset/NAME` or `leaderworkerset/NAME`."""

    kind: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Workload:
        kind, sep, name = text.partition("/")
        if not sep or kind not in WORKLOAD_KINDS or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
            raise ValueError(f"workload {text!r} must be statefulset/NAME or leaderworkerset/NAME")
        return cls(kind, name)


def api_client(api_url: str | None = None):
    """A `kubernetes` ApiClient: `api_url` as is (no auth, e.g. `kubectl proxy`), else in-cluster, else kubeconfig."""
    from kubernetes import client, config

    if api_url:
        configuration = client.Configuration()
        configuration.host = api_url.rstrip("/")
        return client.ApiClient(configuration)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


class KubernetesConnector:
    """Pools as Kubernetes workloads; a PoolConnector (see planner/connectors.py).

    `workloads` maps "prefill"/"decode" to a Workload (a pool without one has no
    workers). `router_http_url` is the entry server's HTTP endpoint (the router's
    drain action); `worker_metrics_url` a template of a worker's metrics page
    with `{name}` (`decode_3`), `{ordinal}`, `{workload}` and `{namespace}`.
    A drain that runs past `drain_timeout_s` is called off (the router routes to
    the worker again) and raises TimeoutError with `spec.replicas` unchanged; a
    new worker not ready after `ready_timeout_s` is scaled away again and raises
    TimeoutError.
    """

    def __init__(
        self,
        workloads: dict[str, Workload],
        namespace: str,
        router_http_url: str,
        worker_metrics_url: str,
        client=None,
        headers: dict[str, str] | None = None,
        drain_timeout_s: float = 120.0,
        ready_timeout_s: float = 600.0,
        poll_s: float = 1.0,
    ) -> None:
        from kubernetes import client as k8s

        unknown = set(workloads) - set(POOLS)
        if unknown:
            raise ValueError(f"workloads are keyed by pool ({', '.join(POOLS)}), got {', '.join(sorted(unknown))}")
        self._workloads = workloads
        self._namespace = namespace
        self._router_http_url = router_http_url
        self._worker_metrics_url = worker_metrics_url
        api = client if client is not None else api_client()
        self._apps = k8s.AppsV1Api(api)
        self._custom = k8s.CustomObjectsApi(api)
        self._headers = headers or {}
        self._drain_timeout_s = drain_timeout_s
        self._ready_timeout_s = ready_timeout_s
        self._poll_s = poll_s

    def workers(self, pool: str) -> list[str]:
        """Worker names of `pool`'s ordinals 0..replicas-1 (the workload's `spec.replicas`)."""
        return [f"{pool}_{ordinal}" for ordinal in range(self._replicas(pool))]

    def add_worker(self, pool: str) -> str:
        """Raise `pool`'s replicas by one; returns the new worker's name once its pod is ready."""
        num = self._replicas(pool)
        self._scale(pool, num + 1)
        deadline_s = time.monotonic() + self._ready_timeout_s
        while self._ready_replicas(pool) < num + 1:
            if time.monotonic() > deadline_s:
                self._scale(pool, num)
                raise TimeoutError(f"{pool}_{num} was not ready {self._ready_timeout_s:g} s after scaling up; scaled back")
            time.sleep(self._poll_s)
        name = f"{pool}_{num}"
        # A worker of the same name removed before the router noticed would still be drained there.
        self._router("undrain", name)
        return name

    def remove_worker(self, pool: str) -> str | None:
        """Drain the highest ordinal of `pool`, then lower its replicas; returns its name (None: no worker)."""
        num = self._replicas(pool)
        if num == 0:
            return None
        name = f"{pool}_{num - 1}"
        self._router("drain", name)
        try:
            wait_until_idle(
                name, lambda: self._router("inflight", name), lambda: self._is_busy(pool, num - 1), self._drain_timeout_s, self._poll_s
            )
            self._scale(pool, num - 1)
        except BaseException:
            self._router("undrain", name)
            raise
        return name

    def _router(self, action: str, name: str) -> int:
        from triton_disagg.model_control import router_action

        return router_action(self._router_http_url, action, name, self._headers)

    def _is_busy(self, pool: str, ordinal: int) -> bool:
        workload = self._workloads[pool]
        url = self._worker_metrics_url.format(
            name=f"{pool}_{ordinal}", ordinal=ordinal, workload=workload.name, namespace=self._namespace
        )
        response = requests.get(url, timeout=10)
        response.raise_for_status()
        return not is_worker_idle(response.text, f"{pool}_{ordinal}")

    def _replicas(self, pool: str) -> int:
        workload = self._workloads.get(pool)
        if workload is None:
            return 0
        if workload.kind == "statefulset":
            scale = self._apps.read_namespaced_stateful_set_scale(workload.name, self._namespace)
            return scale.spec.replicas or 0
        scale = self._custom.get_namespaced_custom_object_scale(LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, workload.name)
        return scale.get("spec", {}).get("replicas") or 0

    def _ready_replicas(self, pool: str) -> int:
        workload = self._workloads[pool]
        if workload.kind == "statefulset":
            status = self._apps.read_namespaced_stateful_set_status(workload.name, self._namespace).status
            return (status.ready_replicas or 0) if status else 0
        lws = self._custom.get_namespaced_custom_object_status(LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, workload.name)
        return lws.get("status", {}).get("readyReplicas") or 0

    def _scale(self, pool: str, replicas: int) -> None:
        workload = self._workloads.get(pool)
        if workload is None:
            raise ValueError(f"pool {pool} has no workload to scale; pass --{pool}-workload")
        body = {"spec": {"replicas": replicas}}
        if workload.kind == "statefulset":
            self._apps.patch_namespaced_stateful_set_scale(workload.name, self._namespace, body, _content_type=MERGE_PATCH)
        else:
            self._custom.patch_namespaced_custom_object_scale(
                LWS_GROUP, LWS_VERSION, self._namespace, LWS_PLURAL, workload.name, body, _content_type=MERGE_PATCH
            )
