"""Pod templates of a rendered deployment: the entry server, worker pools and planners.

Every container runs the same image. Its entrypoint is `triton-disagg`; the
arguments say which part of the deployment the pod is. A worker learns its id
from a pod label Kubernetes sets: the StatefulSet ordinal
(`apps.kubernetes.io/pod-index`, Kubernetes 1.28+) or the LeaderWorkerSet group
index; a pod of a multi-node group learns its rank from `LWS_WORKER_INDEX`,
which LeaderWorkerSet injects.
"""

from __future__ import annotations

from decimal import Decimal

from triton_disagg.deploy.spec import DeploymentSpec, ModelSpec, PoolSpec, Resources

SPEC_DIR = "/etc/triton-disagg"
GPU_RESOURCE = "nvidia.com/gpu"
#: The environment variables of `serve --worker-id` and `serve --advertise-host`.
WORKER_ID_ENV = "TRITON_DISAGG_WORKER_ID"
ADVERTISE_HOST_ENV = "TRITON_DISAGG_ADVERTISE_HOST"


def entry_triton_ports(spec: DeploymentSpec) -> list[dict]:
    """The entry pod's Triton ports: the first model's entry server, then each other model's (suffixed by its index)."""
    ports = []
    for m, model in enumerate(spec.models):
        server = spec.model_server(model)
        suffix = "" if m == 0 else f"-{m}"
        named = (("triton-http", server.http_port), ("triton-grpc", server.grpc_port), ("metrics", server.metrics_port))
        ports += [{"name": f"{name}{suffix}", "containerPort": port} for name, port in named]
    return ports


def labels_of(spec: DeploymentSpec, component: str, model: ModelSpec | None = None, pool: PoolSpec | None = None) -> dict[str, str]:
    """The labels that select one part of a deployment (also its pods' labels)."""
    labels = {
        "app.kubernetes.io/name": "triton-disagg",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
    }
    if model is not None:
        labels["triton-disagg.io/model"] = model.slug
    if pool is not None:
        labels["triton-disagg.io/pool"] = pool.pool_name
        labels["triton-disagg.io/role"] = pool.role.value
    return labels


def _http_probe(path: str, port: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "failureThreshold": failures, "timeoutSeconds": 5}


def _resources(resources: Resources, parts: int = 1) -> dict:
    """requests/limits of one pod holding 1/parts of a replica's resources."""
    requests, limits = {}, {}
    if resources.cpu:
        requests["cpu"] = divide_quantity(resources.cpu, parts)
    if resources.memory:
        requests["memory"] = limits["memory"] = divide_quantity(resources.memory, parts)
    if resources.gpus:
        limits[GPU_RESOURCE] = str(resources.gpus // parts)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


class PodBuilder:
    """Pod templates sharing the spec's image, its ConfigMap and the model volume."""

    #: Where a worker's id comes from: the StatefulSet pod ordinal, or the LeaderWorkerSet group.
    STATEFUL_SET_INDEX = "metadata.labels['apps.kubernetes.io/pod-index']"
    LWS_GROUP_INDEX = "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"

    def __init__(self, spec: DeploymentSpec, config_map: str, entry_service: str) -> None:
        """`entry_service`: the Service of the entry pod, where worker pods reach their model's entry server."""
        self.spec = spec
        self.config_map = config_map
        self.entry_service = entry_service

    def _serve_args(self, component: str) -> list[str]:
        return ["serve", "--deployment", f"{SPEC_DIR}/deployment.yaml", "--component", component]

    def _container(self, args: list[str], ports: list[dict], resources: dict) -> dict:
        k8s = self.spec.kubernetes
        container = {
            "name": "triton-disagg",
            "image": k8s.image,
            "imagePullPolicy": k8s.image_pull_policy,
            "args": args,
            "ports": ports,
            "volumeMounts": [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}],
        }
        if resources:
            container["resources"] = resources
        return container

    def _pod(self, labels: dict[str, str], containers: list[dict], volumes: list[dict], **pod_spec) -> dict:
        k8s = self.spec.kubernetes
        volumes = [{"name": "spec", "configMap": {"name": self.config_map}}, *volumes]
        mounts = []
        if k8s.models_claim:
            volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": k8s.models_claim, "readOnly": True}})
            mounts.append({"name": "models", "mountPath": k8s.models_mount_path, "readOnly": True})
        for container in containers:
            container["volumeMounts"] += mounts
        spec = {
            "containers": containers,
            "volumes": volumes,
            "terminationGracePeriodSeconds": k8s.termination_grace_period_s,
            **pod_spec,
        }
        return {"metadata": {"labels": labels}, "spec": spec}

    def _triton_ports(self, server) -> list[dict]:
        return [
            {"name": "triton-http", "containerPort": server.http_port},
            {"name": "triton-grpc", "containerPort": server.grpc_port},
            {"name": "metrics", "containerPort": server.metrics_port},
        ]

    def entry_template(self, labels: dict[str, str]) -> dict:
        """The entry server (llm, routers, KV directory) with the OpenAI frontend in the same container."""
        spec = self.spec
        ports = entry_triton_ports(spec)
        container = self._container(self._serve_args("entry"), ports, _resources(spec.frontend.resources))
        if spec.frontend.port:
            ports.insert(0, {"name": "openai", "containerPort": spec.frontend.port})
            # /health answers 200 once Triton and `llm` are ready; /live while the frontend runs.
            container["startupProbe"] = _http_probe("/live", "openai", 10, 60)
            container["readinessProbe"] = _http_probe("/health", "openai", 5, 3)
            container["livenessProbe"] = _http_probe("/v2/health/live", "triton-http", 10, 3)
        else:
            container["startupProbe"] = _http_probe("/v2/health/live", "triton-http", 10, 60)
            container["readinessProbe"] = _http_probe("/v2/models/llm/ready", "triton-http", 5, 3)
            container["livenessProbe"] = _http_probe("/v2/health/live", "triton-http", 10, 3)
        if spec.frontend.api_keys_secret:
            key_ref = {"name": spec.frontend.api_keys_secret, "key": "api-keys"}
            container["env"] = [{"name": "TRITON_DISAGG_API_KEYS", "valueFrom": {"secretKeyRef": key_ref}}]
        return self._pod(labels, [container], [])

    def worker_template(
        self, model: ModelSpec, pool: PoolSpec, labels: dict[str, str], index_field: str, nodes: int = 1, is_leader: bool = False
    ) -> dict:
        """One worker's pod (with `nodes` > 1: one pod of its group; the leader serves, the others hold ranks)."""
        server = self.spec.pool_server(pool)
        worker = f"{pool.role.template}_$({WORKER_ID_ENV})"
        container = self._container(
            [*self._serve_args(f"{model.name}/{pool.pool_name}"), "--entry-host", self.entry_service],
            self._triton_ports(server),
            _resources(pool.resources, nodes),
        )
        container["env"] = [
            {"name": WORKER_ID_ENV, "valueFrom": {"fieldRef": {"fieldPath": index_field}}},
            # The entry server's router and KV directory reach this pod's Triton and event sockets here.
            {"name": ADVERTISE_HOST_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ]
        if nodes == 1 or is_leader:
            # Ready when Triton is and the worker model is loaded: Triton alone turns ready before its workers load.
            container["env"].append({"name": "WORKER_MODEL", "value": worker})
            http = f"http://127.0.0.1:{server.http_port}"
            check = f"curl -fsS -o /dev/null {http}/v2/health/ready && curl -fsS -o /dev/null {http}/v2/models/$WORKER_MODEL/ready"
            container["readinessProbe"] = {"exec": {"command": ["sh", "-c", check]}, "periodSeconds": 5, "failureThreshold": 3, "timeoutSeconds": 5}
        container["startupProbe"] = _http_probe("/v2/health/live", "triton-http", 10, 90)
        container["livenessProbe"] = _http_probe("/v2/health/live", "triton-http", 10, 3)
        volumes, mounts = [], []
        if pool.kv.kv_disk_path:
            volumes.append({"name": "kv-disk", "emptyDir": {}})
            mounts.append({"name": "kv-disk", "mountPath": pool.kv.kv_disk_path})
        pod_spec = {}
        if pool.resources.gpus:
            # NCCL and NIXL move tensors through shared memory; the container default (64 MiB) is too small.
            volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
            mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
            pod_spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
        container["volumeMounts"] += mounts
        selector = dict(pool.placement.node_selector)
        if pool.placement.host:
            selector["kubernetes.io/hostname"] = pool.placement.host
        if selector:
            pod_spec["nodeSelector"] = selector
        return self._pod(labels, [container], volumes, **pod_spec)

    def planner_template(self, labels: dict[str, str], args: list[str], metrics_port: int, service_account: str) -> dict:
        """A planner's pod: scrapes the entry server, patches its pools' scale subresource."""
        container = self._container(
            args,
            [{"name": "planner-metrics", "containerPort": metrics_port}],
            {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        )
        container["livenessProbe"] = _http_probe("/metrics", "planner-metrics", 30, 3)
        return self._pod(labels, [container], [], serviceAccountName=service_account)



def divide_quantity(quantity: str, parts: int) -> str:
    """A Kubernetes quantity split evenly over `parts` pods ("512Gi" / 2 -> "256Gi", "3" / 2 -> "1.5")."""
    number = quantity.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    text = format((Decimal(number) / parts).normalize(), "f")
    return text + quantity[len(number) :]
