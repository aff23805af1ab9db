"""The deployment spec: the examples are valid, and every bad spec is refused with the field named."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from triton_disagg.cli.main import main
from triton_disagg.deploy.load import SpecError, dump_spec, load_spec, parse_spec
from triton_disagg.deploy.spec import DeploymentSpec, Role

EXAMPLES_DIR = Path(__file__).parents[2] / "docker" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
LAPTOP = yaml.safe_load((EXAMPLES_DIR / "cpu-laptop.yaml").read_text())


def laptop(**changes) -> dict:
    """The CPU laptop example as data, with `changes` applied: keys are dotted paths ("models.0.pools.1.role")."""
    data = copy.deepcopy(LAPTOP)
    for path, value in changes.items():
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
    return data


def test_the_examples_are_the_ones_the_docs_name():
    assert {p.name for p in EXAMPLES} >= {"cpu-laptop.yaml", "one-node-8gpu.yaml", "two-nodes.yaml", "local-multi-server.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid_and_dumps_back_to_itself(path):
    spec = load_spec(path)
    assert parse_spec(yaml.safe_load(dump_spec(spec))) == spec


def test_defaults_fill_in_a_minimal_spec():
    spec = parse_spec({"models": [{"name": "m", "pools": [{"role": "aggregated"}]}]})
    (pool,) = spec.models[0].pools
    assert (spec.name, spec.entry_server.http_port, spec.frontend.port) == ("triton-disagg", 8000, 8080)
    assert (pool.pool_name, pool.role, pool.replicas.num_initial, pool.replicas.num_max) == ("aggregated", Role.AGGREGATED, 1, 1)
    assert spec.pool_server(pool) is spec.servers[0]


def test_local_multi_server_names_three_servers_on_loopback():
    spec = load_spec(EXAMPLES_DIR / "local-multi-server.yaml")
    assert [(s.name, s.address, s.http_port) for s in spec.servers] == [
        ("entry", "127.0.0.1", 8000),
        ("prefill", "127.0.0.2", 8000),
        ("decode", "127.0.0.3", 8000),
    ]
    assert (spec.entry_server.name, spec.frontend.port) == ("entry", 8080)
    assert [spec.pool_server(p).name for p in spec.models[0].pools] == ["prefill", "decode"]


BAD_SPECS = [
    ({"models": None}, "models: Input should be a valid list"),
    ({"models.0.pools.0.replicas": {"min": 3, "max": 2}}, "models[0].pools[0].replicas: max (2) must be >= min (3) and initial (3)"),
    ({"models.0.pools.0.replicas": {"min": 2, "initial": 1}}, "models[0].pools[0].replicas: initial (1) must be >= min (2)"),
    ({"models.0.pools.0.replica": 2}, "models[0].pools[0].replica: unknown field (a typo?)"),
    ({"models.0.pools.0.role": "encode"}, "models[0].pools[0].role: Input should be 'prefill', 'decode' or 'aggregated'"),
    ({"models.0.pools.1.resources": {"memory": "lots"}}, "models[0].pools[1].resources.memory: 'lots' is not a quantity"),
    ({"models.0.pools.0.server": "gpu"}, "models[0].pools[0].server: 'gpu' is not one of the servers (main)"),
    ({"frontend.server": "edge"}, "frontend.server: 'edge' is not one of the servers (main)"),
    ({"servers.0.grpc_port": 8000}, "servers[0]: http_port, grpc_port and metrics_port must differ"),
    ({"servers.0.http_port": 70000}, "servers[0].http_port: Input should be less than or equal to 65535"),
    ({"frontend.port": 8001}, "frontend: port 8001 on 0.0.0.0 is also taken by servers[0]"),
    ({"models.0.pools.0.role": "aggregated"}, "models[0].pools: an aggregated pool cannot be combined with prefill or decode pools"),
    ({"models.0.pools.1.role": "prefill"}, "models[0].pools[1].role: a model has one prefill pool (its workers are named prefill_<id>)"),
    ({"models.0.planner.policy": "slo"}, "models[0].planner: policy slo needs profile"),
    ({"models.0.planner.policy": "fast"}, "models[0].planner.policy: String should match pattern"),
    ({"models.0.pools.1.kv": {"kv_disk_path": "/kv"}}, "models[0].pools[1].kv: kv_disk_path and kv_disk_blocks go together"),
    ({"models.0.pools.1.kv": {"num_blocks": 0}}, "models[0].pools[1].kv.num_blocks: Input should be greater than or equal to 1"),
    ({"models.0.pools.0.resources": {"gpus": 2}}, "models[0].pools[0]: resources.gpus (2) must equal the worker's ranks"),
    ({"models.0.pools.0.parallelism": {"tensor_parallel_size": 2}}, "models[0].pools[0]: parallelism.tensor_parallel_size > 1 needs GPUs"),
    ({"models.0.pools.0.parallelism": {"tensor_parallel_size": 4, "nodes_per_replica": 3}}, "models[0].pools[0].parallelism: nodes_per_replica (3) must divide the worker's ranks"),
    ({"models.0.pools.1.replicas": {"min": 0}}, "models[0].pools[1]: replicas.min must be >= 1 for a decode pool"),
    ({"name": "Bad_Name"}, "name: String should match pattern"),
    ({"models.0.name": "has space"}, "models[0].name: String should match pattern"),
    ({"models.0.pools.0.name": "x" * 21}, "models[0].pools[0].name: String should have at most 20 characters"),
    ({"kubernetes.image_pull_policy": "Sometimes"}, "kubernetes.image_pull_policy: String should match pattern"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_a_bad_spec_is_refused_naming_the_field(changes, message):
    with pytest.raises(SpecError) as refused:
        parse_spec(laptop(**changes), "deploy.yaml")
    assert str(refused.value).startswith("deploy.yaml: invalid deployment spec\n")
    assert message in str(refused.value)


def test_every_problem_is_reported_at_once():
    data = laptop(**{"models.0.pools.0.role": "encode", "servers.0.http_port": 0})
    with pytest.raises(SpecError) as refused:
        parse_spec(data)
    lines = str(refused.value).splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == ["servers[0].http_port", "models[0].pools[0].role"]


def test_two_models_with_one_name_are_refused():
    data = laptop()
    data["models"].append(copy.deepcopy(data["models"][0]))
    with pytest.raises(SpecError, match=r"models\[1\]\.name: model 'tiny-llama' is declared twice"):
        parse_spec(data)


def test_a_kubernetes_name_too_long_for_a_statefulset_is_refused():
    data = laptop(**{"name": "a" * 30, "models.0.name": "b" * 30})
    with pytest.raises(SpecError, match=r"models\[0\]\.pools\[0\]\.name: the Kubernetes name .* longer than 52"):
        parse_spec(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [("models: [", "not valid YAML"), ("- 1\n- 2\n", "the top level must be a mapping"), ("", "the top level must be a mapping")],
)
def test_a_file_that_is_no_spec_is_refused(tmp_path, text, message):
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: cannot read the deployment spec"):
        load_spec(tmp_path / "missing.yaml")


def test_deploy_check_exits_nonzero_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(laptop(**{"models.0.pools.0.replicas": {"min": 3, "max": 2}})))
    assert main(["deploy", "check", str(bad)]) == 1
    assert "models[0].pools[0].replicas: max (2) must be >= min (3)" in capsys.readouterr().err


def test_deploy_check_says_where_a_valid_spec_runs(capsys):
    assert main(["deploy", "check", str(EXAMPLES_DIR / "local-multi-server.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid deployment spec 'local-multi'" in out
    assert "one machine: runs with `triton-disagg serve --deployment" in out
    assert "Kubernetes:  9 manifests" in out
    assert main(["deploy", "check", str(EXAMPLES_DIR / "multi-node-tp.yaml")]) == 0
    assert "one machine: not yet: models[0].pools[0].parallelism.nodes_per_replica: the engine has no tensor parallelism yet" in capsys.readouterr().out


def test_a_spec_is_frozen():
    spec = load_spec(EXAMPLES_DIR / "cpu-laptop.yaml")
    with pytest.raises(Exception):
        spec.name = "other"
    assert isinstance(spec, DeploymentSpec)
