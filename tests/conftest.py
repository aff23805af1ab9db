"""A local stand-in for the part of the Kubernetes API the planner's connector uses.

No cluster runs here, so `FakeKubernetesApi` serves, over real HTTP on
127.0.0.1, what `triton_disagg.planner.kubernetes` calls through the official
client: the `scale` subresource (GET, PATCH) and `status` of StatefulSets
(apps/v1) and LeaderWorkerSets (leaderworkerset.x-k8s.io/v1). It answers
the way the API server does where the connector depends on it: a PATCH must
be a merge or strategic-merge patch (a JSON patch with an object body is a 400),
and custom resources take no strategic-merge patch (415); unknown objects and
namespaces are 404 with a Status body. A `controller`
hook plays the workload controller: it is called on every change of
`spec.replicas` and decides when pods are ready.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_PATH = re.compile(
    r"^/apis/(?P<group>apps|leaderworkerset\.x-k8s\.io)/v1/namespaces/(?P<namespace>[^/]+)/"
    r"(?P<plural>statefulsets|leaderworkersets)/(?P<name>[^/]+)/(?P<sub>scale|status)$"
)
_PATCH_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


@dataclass
class FakeWorkload:
    kind: str  # "statefulset" or "leaderworkerset"
    replicas: int
    ready: int


@dataclass
class FakeKubernetesApi:
    """Workloads in one namespace; `requests` logs (method, path, content type, body) of every call."""

    namespace: str = "llm"
    workloads: dict[str, FakeWorkload] = field(default_factory=dict)
    #: Called as controller(api, name, old_replicas, new_replicas) after a scale PATCH; None: pods ready at once.
    controller: Callable[["FakeKubernetesApi", str, int, int], None] | None = None
    requests: list[tuple[str, str, str, object]] = field(default_factory=list)
    url: str = ""

    def add(self, name: str, replicas: int, kind: str = "statefulset") -> None:
        self.workloads[name] = FakeWorkload(kind, replicas, replicas)

    def patches(self) -> list[tuple[str, int]]:
        """(workload, replicas) of every accepted scale PATCH, in order."""
        return [(path.split("/")[-2], body["spec"]["replicas"]) for method, path, _, body in self.requests if method == "PATCH" and isinstance(body, dict) and "spec" in body]

    def handle(self, method: str, path: str, content_type: str, body: object) -> tuple[int, dict]:
        self.requests.append((method, path, content_type, body))
        match = _PATH.match(path.split("?")[0])
        if not match or match["namespace"] != self.namespace or match["name"] not in self.workloads:
            return 404, _status(404, "NotFound", f"{path} not found")
        workload = self.workloads[match["name"]]
        if workload.kind != match["plural"].rstrip("s"):
            return 404, _status(404, "NotFound", f"{path} not found")
        if method == "PATCH":
            if match["sub"] != "scale":
                return 405, _status(405, "MethodNotAllowed", "only the scale subresource is patched here")
            if content_type == _PATCH_TYPES[1] and match["group"] != "apps":
                return 415, _status(415, "UnsupportedMediaType", f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml")
            if content_type not in _PATCH_TYPES:
                return 400, _status(400, "BadRequest", f"json: cannot unmarshal object into Go value of type jsonpatch.Patch ({content_type})")
            replicas = body.get("spec", {}).get("replicas") if isinstance(body, dict) else None
            if not isinstance(replicas, int) or replicas < 0:
                return 422, _status(422, "Invalid", "spec.replicas: Invalid value: must be a non-negative integer")
            old, workload.replicas = workload.replicas, replicas
            if self.controller is None:
                workload.ready = replicas
            else:
                self.controller(self, match["name"], old, replicas)
        elif method != "GET":
            return 405, _status(405, "MethodNotAllowed", method)
        return 200, _object(match, workload)


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


def _object(match: re.Match, workload: FakeWorkload) -> dict:
    meta = {"name": match["name"], "namespace": match["namespace"]}
    if match["sub"] == "scale":
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": meta,
            "spec": {"replicas": workload.replicas},
            "status": {"replicas": workload.replicas, "selector": f"app={match['name']}"},
        }
    labels = {"app": match["name"]}
    template = {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "worker", "image": "triton-disagg"}]}}
    if workload.kind == "statefulset":
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": meta,
            "spec": {"replicas": workload.replicas, "serviceName": match["name"], "selector": {"matchLabels": labels}, "template": template},
            "status": {"replicas": workload.replicas, "readyReplicas": workload.ready, "availableReplicas": workload.ready},
        }
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": meta,
        "spec": {"replicas": workload.replicas, "leaderWorkerTemplate": {"size": 2, "workerTemplate": template}},
        "status": {"replicas": workload.replicas, "readyReplicas": workload.ready},
    }


class _Handler(BaseHTTPRequestHandler):
    api: FakeKubernetesApi

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        code, payload = self.api.handle(self.command, self.path, content_type, body)
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_PUT = do_POST = do_DELETE = _serve

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_kubernetes() -> Iterator[FakeKubernetesApi]:
    """A FakeKubernetesApi listening on 127.0.0.1 (its `url`), stopped after the test."""
    api = FakeKubernetesApi()
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
