"""Kubernetes manifests rendered from the example specs, validated offline against the Kubernetes schemas.

Built-in kinds are checked with kubernetes-validate (the API's OpenAPI schemas, strict: unknown fields
fail). LeaderWorkerSet is a custom resource: it is checked against the openAPIV3Schema of its CRD
(schemas/leaderworkerset-crd.yaml, written from the upstream Go types; the CRD itself is validated as
a CustomResourceDefinition), made strict the same way, and its pod templates against Kubernetes'
PodTemplateSpec.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from triton_disagg.cli.main import _build_parser, main
from triton_disagg.deploy.kubernetes import render_manifests
from triton_disagg.deploy.pods import divide_quantity
from triton_disagg.deploy.load import SpecError, load_spec, parse_spec

#: Worker ids come from the pod-index label, which Kubernetes sets from 1.28 on.
KUBERNETES_VERSION = "1.30.0"
EXAMPLES_DIR = Path(__file__).parents[2] / "docker" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
LWS_CRD = yaml.safe_load((Path(__file__).parent / "schemas" / "leaderworkerset-crd.yaml").read_text())


def _strict(schema: dict) -> dict:
    """The schema with unknown fields refused wherever it lists the fields (as kubernetes-validate's strict)."""
    schema = copy.deepcopy(schema)
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for key in ("properties",):
        for name, sub in schema.get(key, {}).items():
            schema[key][name] = _strict(sub)
    if isinstance(schema.get("items"), dict):
        schema["items"] = _strict(schema["items"])
    return schema


LWS_SCHEMA = _strict(LWS_CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def validate(manifest: dict) -> None:
    """Raise if `manifest` does not match its kind's schema."""
    if manifest["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        return
    jsonschema.validate(manifest, LWS_SCHEMA)
    templates = manifest["spec"]["leaderWorkerTemplate"]
    for key in ("leaderTemplate", "workerTemplate"):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": templates[key]}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)


def rendered(name: str) -> list[dict]:
    return render_manifests(load_spec(EXAMPLES_DIR / name))


def one(manifests: list[dict], kind: str, name: str) -> dict:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_rendered_manifest_passes_its_schema(path):
    manifests = render_manifests(load_spec(path))
    for manifest in manifests:
        validate(manifest)
    assert len({(m["kind"], m["metadata"]["name"]) for m in manifests}) == len(manifests)
    assert {m["metadata"]["namespace"] for m in manifests} == {load_spec(path).kubernetes.namespace}


def test_the_lws_crd_is_a_valid_crd_and_its_schema_catches_bad_fields():
    kubernetes_validate.validate(LWS_CRD, KUBERNETES_VERSION, strict=True)
    lws = one(rendered("multi-node-tp.yaml"), "LeaderWorkerSet", "multi-model-llama-3-1-405b-instruct-aggregated")
    for path, value in [(("restartPolicy",), "Always"), (("sizes",), 2), (("size",), "2")]:
        bad = copy.deepcopy(lws)
        bad["spec"]["leaderWorkerTemplate"][path[0]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_each_pool_is_a_stateful_set_whose_ordinal_is_the_worker_id():
    manifests = rendered("one-node-8gpu.yaml")
    name = "llama8b-llama-3-1-8b-instruct-prefill"
    stateful_set = one(manifests, "StatefulSet", name)
    headless = one(manifests, "Service", name)
    assert headless["spec"]["clusterIP"] == "None"
    assert stateful_set["spec"]["serviceName"] == name
    assert stateful_set["spec"]["replicas"] == 2
    assert headless["spec"]["selector"] == stateful_set["spec"]["selector"]["matchLabels"]
    worker = container(stateful_set)
    assert worker["image"] == "registry.example.com/triton-disagg:0.1.0-gpu"
    assert worker["args"] == [
        "serve", "--deployment", "/etc/triton-disagg/deployment.yaml", "--component", "llama-3.1-8b-instruct/prefill",
        "--entry-host", "llama8b-entry",
    ]  # fmt: skip
    env = env_of(worker)
    assert env["TRITON_DISAGG_WORKER_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    # The entry's router and KV directory reach the worker at its pod's address.
    assert env["TRITON_DISAGG_ADVERTISE_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["WORKER_MODEL"] == "prefill_$(TRITON_DISAGG_WORKER_ID)"
    assert worker["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi", "nvidia.com/gpu": "2"}}
    probe = " ".join(worker["readinessProbe"]["exec"]["command"])
    assert "http://127.0.0.1:8000/v2/health/ready" in probe and "/v2/models/$WORKER_MODEL/ready" in probe
    assert worker["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "triton-http"}
    pod = stateful_set["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {v["name"] for v in pod["volumes"]} == {"spec", "dshm", "models"}


def test_the_config_map_carries_the_spec_every_pod_mounts():
    spec = load_spec(EXAMPLES_DIR / "two-nodes.yaml")
    manifests = render_manifests(spec)
    config_map = one(manifests, "ConfigMap", "two-nodes-spec")
    assert parse_spec(yaml.safe_load(config_map["data"]["deployment.yaml"])) == spec
    for workload in (m for m in manifests if m["kind"] in ("Deployment", "StatefulSet")):
        volumes = workload["spec"]["template"]["spec"]["volumes"]
        assert {"name": "spec", "configMap": {"name": "two-nodes-spec"}} in volumes


def test_placement_and_kv_tiers_reach_the_pods():
    manifests = rendered("two-nodes.yaml")
    prefill = one(manifests, "StatefulSet", "two-nodes-llama-3-1-8b-instruct-prefill")
    decode = one(manifests, "StatefulSet", "two-nodes-llama-3-1-8b-instruct-decode")
    assert prefill["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "gpu-node-a"}
    assert decode["spec"]["template"]["spec"]["nodeSelector"] == {"kubernetes.io/hostname": "gpu-node-b"}
    mounts = {m["name"]: m["mountPath"] for m in container(decode)["volumeMounts"]}
    assert mounts["kv-disk"] == "/var/cache/triton-disagg/kv"


def test_the_entry_server_and_frontend_are_one_deployment_behind_a_service():
    manifests = rendered("one-node-8gpu.yaml")
    deployment = one(manifests, "Deployment", "llama8b-entry")
    service = one(manifests, "Service", "llama8b-entry")
    entry = container(deployment)
    assert entry["args"][-2:] == ["--component", "entry"]
    assert entry["readinessProbe"]["httpGet"] == {"path": "/health", "port": "openai"}
    assert entry["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "triton-http"}
    assert [p["port"] for p in service["spec"]["ports"]] == [8080, 8000, 8001, 8002]
    secret = {"secretKeyRef": {"name": "triton-disagg-api-keys", "key": "api-keys"}}
    assert env_of(entry)["TRITON_DISAGG_API_KEYS"] == secret


def test_no_key_or_secret_value_is_rendered():
    text = yaml.safe_dump_all(rendered("one-node-8gpu.yaml"))
    assert "Bearer" not in text and "api_keys:" not in text and "model_control_key" not in text


def test_a_pool_spanning_nodes_is_a_leader_worker_set():
    manifests = rendered("multi-node-tp.yaml")
    lws = one(manifests, "LeaderWorkerSet", "multi-model-llama-3-1-405b-instruct-aggregated")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert (lws["spec"]["replicas"], template["size"], template["restartPolicy"]) == (1, 2, "RecreateGroupOnPodRestart")
    leader = template["leaderTemplate"]["spec"]["containers"][0]
    worker = template["workerTemplate"]["spec"]["containers"][0]
    # 16 GPUs, 64 CPUs and 1024Gi per worker, over two pods
    assert leader["resources"] == {"requests": {"cpu": "32", "memory": "512Gi"}, "limits": {"memory": "512Gi", "nvidia.com/gpu": "8"}}
    assert env_of(leader)["TRITON_DISAGG_WORKER_ID"]["fieldRef"]["fieldPath"] == "metadata.labels['leaderworkerset.sigs.k8s.io/group-index']"
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    assert not [m for m in manifests if m["kind"] == "StatefulSet" and "405b" in m["metadata"]["name"]]
    assert one(manifests, "PodDisruptionBudget", lws["metadata"]["name"])["spec"]["maxUnavailable"] == 1


def test_every_pool_has_a_disruption_budget_selecting_its_pods():
    manifests = rendered("multi-node-tp.yaml")
    budgets = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {
        "multi-model-llama-3-1-405b-instruct-aggregated",
        "multi-model-qwen2-5-7b-instruct-prefill",
        "multi-model-qwen2-5-7b-instruct-decode",
    }
    decode = one(manifests, "StatefulSet", "multi-model-qwen2-5-7b-instruct-decode")
    assert budgets[decode["metadata"]["name"]]["spec"]["selector"] == decode["spec"]["selector"]


def test_a_planner_gets_a_role_to_scale_its_pools_and_arguments_plan_accepts():
    manifests = rendered("multi-node-tp.yaml")
    rules = one(manifests, "Role", "multi-model-planner")["rules"]
    assert {"apiGroups": ["apps"], "resources": ["statefulsets/scale"], "verbs": ["get", "patch", "update"]} in rules
    assert {"apiGroups": ["leaderworkerset.x-k8s.io"], "resources": ["leaderworkersets/scale"], "verbs": ["get", "patch", "update"]} in rules
    binding = one(manifests, "RoleBinding", "multi-model-planner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "multi-model-planner", "namespace": "llm"}]
    planner = one(manifests, "Deployment", "multi-model-planner-qwen2-5-7b-instruct")
    assert planner["spec"]["template"]["spec"]["serviceAccountName"] == "multi-model-planner"
    args = _build_parser().parse_args(container(planner)["args"])
    assert (args.connector, args.namespace, args.policy) == ("kubernetes", "llm", "load")
    assert (args.prefill_workload, args.decode_workload) == (
        "statefulset/multi-model-qwen2-5-7b-instruct-prefill",
        "statefulset/multi-model-qwen2-5-7b-instruct-decode",
    )
    assert (args.min_decode_workers, args.max_decode_workers, args.device_budget) == (1, 3, 4)
    assert args.http_url == "http://multi-model-entry:8000"
    assert args.worker_metrics_url == "http://{workload}-{ordinal}.{workload}.{namespace}.svc:8002/metrics"
    # the 405B model's planner is off: no planner for it
    assert not [m for m in manifests if m["metadata"]["name"].endswith("405b-instruct") and m["kind"] == "Deployment"]


def test_the_pods_arguments_are_ones_serve_accepts():
    for manifest in rendered("one-node-8gpu.yaml"):
        if manifest["kind"] in ("Deployment", "StatefulSet") and "planner" not in manifest["metadata"]["name"]:
            args = _build_parser().parse_args(container(manifest)["args"])
            assert args.deployment == "/etc/triton-disagg/deployment.yaml" and args.component


def test_a_planner_bound_to_the_triton_connector_does_not_render():
    data = yaml.safe_load((EXAMPLES_DIR / "cpu-laptop.yaml").read_text())
    data["models"][0]["planner"]["connector"] = "triton"
    with pytest.raises(SpecError, match=r"models\[0\]\.planner\.connector: triton loads workers inside one server"):
        render_manifests(parse_spec(data))


def test_render_writes_one_file_per_kind_or_one_file(tmp_path, capsys):
    spec_path = EXAMPLES_DIR / "one-node-8gpu.yaml"
    assert main(["deploy", "render", str(spec_path), "--out", str(tmp_path / "split")]) == 0
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert files == [
        "configmap.yaml", "deployment.yaml", "poddisruptionbudget.yaml", "role.yaml", "rolebinding.yaml",
        "service.yaml", "serviceaccount.yaml", "statefulset.yaml",
    ]  # fmt: skip
    split = [d for f in files for d in yaml.safe_load_all((tmp_path / "split" / f).read_text())]
    assert main(["deploy", "render", str(spec_path), "--out", str(tmp_path / "one"), "--single-file"]) == 0
    single = list(yaml.safe_load_all((tmp_path / "one" / "manifests.yaml").read_text()))
    key = lambda m: (m["kind"], m["metadata"]["name"])  # noqa: E731
    assert sorted(split, key=key) == sorted(single, key=key) == sorted(render_manifests(load_spec(spec_path)), key=key)
    assert str(tmp_path / "one" / "manifests.yaml") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("quantity", "parts", "share"), [("512Gi", 2, "256Gi"), ("3", 2, "1.5"), ("500m", 2, "250m"), ("16", 1, "16"), ("1.5Gi", 3, "0.5Gi")]
)
def test_a_replica_s_resources_are_split_over_its_pods(quantity, parts, share):
    assert divide_quantity(quantity, parts) == share


def test_the_entry_pod_and_service_expose_each_models_entry_server():
    manifests = render_manifests(load_spec(EXAMPLES_DIR / "two-models.yaml"))
    service = one(manifests, "Service", "two-models-entry")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("openai", 8080),
        ("triton-http", 8000), ("triton-grpc", 8001), ("metrics", 8002),
        ("triton-http-1", 8100), ("triton-grpc-1", 8101), ("metrics-1", 8102),
    ]  # fmt: skip
    entry = container(one(manifests, "Deployment", "two-models-entry"))
    assert {p["name"] for p in entry["ports"]} == {p["name"] for p in service["spec"]["ports"]}
