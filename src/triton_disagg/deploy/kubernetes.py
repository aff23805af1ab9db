"""Kubernetes manifests from a deployment spec.

What a spec renders to, all in the spec's namespace:

- a ConfigMap holding the spec, mounted at /etc/triton-disagg in every pod;
- the entry Deployment and its Service: the Triton server running `llm`, the
  routers and the KV directory, with the OpenAI frontend next to it;
- per worker pool, a StatefulSet (pod ordinal = worker id) and its headless
  Service, or a LeaderWorkerSet when one worker spans several nodes (group
  index = worker id), and a PodDisruptionBudget;
- per model with a planner, a planner Deployment that scales its pools through
  the scale subresource, with a ServiceAccount, Role and RoleBinding.

Every pod runs the image's `triton-disagg` with `serve --deployment` and the
part of the deployment it is (`--component entry` or `--component MODEL/POOL`);
the launcher starts `tritonserver --model-control-mode=explicit`.
"""

from __future__ import annotations

from triton_disagg.deploy.pods import PodBuilder, entry_triton_ports, labels_of
from triton_disagg.deploy.load import SpecError, dump_spec
from triton_disagg.deploy.spec import DeploymentSpec, ModelSpec, PoolSpec, Role

SPEC_FILE = "deployment.yaml"
#: The API group and version of LeaderWorkerSet (sigs.k8s.io/lws); its CRD must be installed.
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


def render_manifests(spec: DeploymentSpec) -> list[dict]:
    """Every manifest of the deployment, as dicts ready for YAML; order: config, RBAC, services, workloads.

    Raises SpecError for a spec that cannot run on Kubernetes (a planner bound to the triton connector).
    """
    names = Names(spec)
    pods = PodBuilder(spec, config_map=names.config_map, entry_service=names.entry)
    manifests = [_config_map(spec, names)]
    planned = [m for m in spec.models if m.planner.policy != "off"]
    for i, model in enumerate(spec.models):
        if model in planned and model.planner.connector == "triton":
            raise SpecError(
                f"models[{i}].planner.connector: triton loads workers inside one server; on Kubernetes the planner "
                "scales StatefulSets: use kubernetes or auto"
            )
    if planned:
        manifests += _planner_rbac(spec, names)
    manifests += [_entry_service(spec, names), _entry_deployment(spec, names, pods)]
    for model in spec.models:
        for pool in model.pools:
            manifests += _pool_manifests(spec, model, pool, pods)
    for model in planned:
        manifests.append(_planner_deployment(spec, model, names, pods))
    return manifests


class Names:
    """Names of the deployment-wide resources."""

    def __init__(self, spec: DeploymentSpec) -> None:
        self.config_map = f"{spec.name}-spec"
        self.entry = f"{spec.name}-entry"
        self.planner_account = f"{spec.name}-planner"

    def planner(self, model: ModelSpec) -> str:
        return f"{self.planner_account}-{model.slug}"[:63].rstrip("-")


def _meta(spec: DeploymentSpec, name: str, labels: dict[str, str]) -> dict:
    return {"name": name, "namespace": spec.kubernetes.namespace, "labels": labels}


def _config_map(spec: DeploymentSpec, names: Names) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(spec, names.config_map, labels_of(spec, "config")),
        "data": {SPEC_FILE: dump_spec(spec)},
    }


def _entry_service(spec: DeploymentSpec, names: Names) -> dict:
    ports = [{"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]} for p in entry_triton_ports(spec)]
    if spec.frontend.port:
        ports.insert(0, {"name": "openai", "port": spec.frontend.port, "targetPort": "openai"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, names.entry, labels_of(spec, "entry")),
        "spec": {"type": spec.kubernetes.service_type, "selector": labels_of(spec, "entry"), "ports": ports},
    }


def _entry_deployment(spec: DeploymentSpec, names: Names, pods: PodBuilder) -> dict:
    labels = labels_of(spec, "entry")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec, names.entry, labels),
        "spec": {
            # One router state per model: a second entry replica would route from its own view.
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": pods.entry_template(labels),
        },
    }


def _pool_manifests(spec: DeploymentSpec, model: ModelSpec, pool: PoolSpec, pods: PodBuilder) -> list[dict]:
    name = spec.workload_name(model, pool)
    labels = labels_of(spec, "worker", model, pool)
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(spec, name, labels),
        # One worker at a time: a drained node costs a pool one worker, never all of them.
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }
    if pool.parallelism.nodes_per_replica > 1:
        return [_leader_worker_set(spec, model, pool, name, labels, pods), pdb]
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(spec, name, labels),
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [
                {"name": "triton-http", "port": spec.pool_server(pool).http_port, "targetPort": "triton-http"},
                {"name": "triton-grpc", "port": spec.pool_server(pool).grpc_port, "targetPort": "triton-grpc"},
                {"name": "metrics", "port": spec.pool_server(pool).metrics_port, "targetPort": "metrics"},
            ],
        },
    }
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _meta(spec, name, labels),
        "spec": {
            "serviceName": name,
            "replicas": pool.replicas.num_initial,
            # Workers are independent: start and stop them together, not one ordinal after another.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": pods.worker_template(model, pool, labels, pods.STATEFUL_SET_INDEX),
        },
    }
    return [headless, stateful_set, pdb]


def _leader_worker_set(
    spec: DeploymentSpec, model: ModelSpec, pool: PoolSpec, name: str, labels: dict[str, str], pods: PodBuilder
) -> dict:
    nodes = pool.parallelism.nodes_per_replica
    return {
        "apiVersion": LWS_API_VERSION,
        "kind": "LeaderWorkerSet",
        "metadata": _meta(spec, name, labels),
        "spec": {
            "replicas": pool.replicas.num_initial,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate", "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
            "leaderWorkerTemplate": {
                "size": nodes,
                # A tensor-parallel group is one engine: losing a pod loses the worker.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": pods.worker_template(model, pool, labels, pods.LWS_GROUP_INDEX, nodes=nodes, is_leader=True),
                "workerTemplate": pods.worker_template(model, pool, labels, pods.LWS_GROUP_INDEX, nodes=nodes),
            },
        },
    }


def _planner_rbac(spec: DeploymentSpec, names: Names) -> list[dict]:
    labels = labels_of(spec, "planner")
    rules = [
        {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["get", "patch", "update"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    ]
    if any(p.parallelism.nodes_per_replica > 1 for m in spec.models for p in m.pools):
        group = LWS_API_VERSION.split("/")[0]
        rules += [
            {"apiGroups": [group], "resources": ["leaderworkersets"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [group], "resources": ["leaderworkersets/scale"], "verbs": ["get", "patch", "update"]},
        ]
    name = names.planner_account
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, name, labels)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(spec, name, labels), "rules": rules},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(spec, name, labels),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.kubernetes.namespace}],
        },
    ]


def planner_args(spec: DeploymentSpec, model: ModelSpec, entry_host: str) -> list[str]:
    """`triton-disagg plan` arguments for one model's planner on Kubernetes (entry_host: the entry Service)."""
    server = spec.entry_server
    args = [
        "plan",
        "--connector", "kubernetes",
        "--namespace", spec.kubernetes.namespace,
        "--http-url", f"http://{entry_host}:{server.http_port}",
        "--metrics-url", f"http://{entry_host}:{server.metrics_port}/metrics",
        *planner_policy_args(model),
    ]  # fmt: skip
    # The pools' pods in their headless Services; the template is filled in by the connector per worker.
    (decode,) = model.pools_of(Role.DECODE, Role.AGGREGATED)
    metrics_port = spec.pool_server(decode).metrics_port
    args += ["--worker-metrics-url", "http://{workload}-{ordinal}.{workload}.{namespace}.svc:" + f"{metrics_port}/metrics"]
    for pool in model.pools:
        pool_flag = "prefill" if pool.role is Role.PREFILL else "decode"
        kind = "leaderworkerset" if pool.parallelism.nodes_per_replica > 1 else "statefulset"
        args += [f"--{pool_flag}-workload", f"{kind}/{spec.workload_name(model, pool)}"]
    return args


def planner_policy_args(model: ModelSpec) -> list[str]:
    """The `plan` arguments a model's planner settings and pools give, wherever it runs: policy, targets,
    pool bounds (prefill bounds 0 without a prefill pool), devices per worker and the device budget."""
    planner = model.planner
    args = [
        "--policy", planner.policy,
        "--interval-s", f"{planner.interval_s:g}",
        "--ttft-ms", f"{planner.ttft_ms:g}",
        "--itl-ms", f"{planner.itl_ms:g}",
        "--planner-port", str(planner.metrics_port),
    ]  # fmt: skip
    if planner.profile:
        args += ["--profile", planner.profile]
    bounds = {"prefill": (0, 0, 1), "decode": (0, 0, 1)}
    for pool in model.pools:
        bounds[pool.role.template] = (pool.replicas.min, pool.replicas.num_max, max(1, pool.resources.gpus))
    for name, (low, high, devices) in bounds.items():
        args += [f"--min-{name}-workers", str(low), f"--max-{name}-workers", str(high)]
        args += [f"--devices-per-{name}-worker", str(devices)]
    budget = planner.device_budget or sum(high * devices for _, high, devices in bounds.values())
    return args + ["--device-budget", str(budget)]


def _planner_deployment(spec: DeploymentSpec, model: ModelSpec, names: Names, pods: PodBuilder) -> dict:
    labels = labels_of(spec, "planner", model)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec, names.planner(model), labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": pods.planner_template(
                labels, planner_args(spec, model, names.entry), model.planner.metrics_port, names.planner_account
            ),
        },
    }

