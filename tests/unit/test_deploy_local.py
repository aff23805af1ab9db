"""`serve --deployment`: a spec as launcher settings (servers, models side by side); what needs more is refused by field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from triton_disagg.cli.deploy import deployment_for_serve
from triton_disagg.cli.main import _build_parser
from triton_disagg.deploy.load import SpecError, load_spec, parse_spec
from triton_disagg.deploy.spec import Role
from triton_disagg.launch.deployment import NotSupportedYet, check_runs_on_one_machine, component_deployment, local_deployment
from triton_disagg.launch.server import ServerConfig, _address_args

EXAMPLES_DIR = Path(__file__).parents[2] / "docker" / "examples"
SERVER_FIELDS = {f.name for f in dataclasses.fields(ServerConfig)}


def spec_with(**model_changes):
    data = yaml.safe_load((EXAMPLES_DIR / "cpu-laptop.yaml").read_text())
    data["models"][0].update(model_changes)
    return parse_spec(data)


def test_the_laptop_spec_maps_onto_one_server_its_frontend_and_planner(tmp_path):
    spec = load_spec(EXAMPLES_DIR / "cpu-laptop.yaml")
    local = local_deployment(spec, model_path=tmp_path / "model", run_dir=tmp_path / "run", api_keys=("k1",))
    server = local.server
    assert (server.model_path, server.run_dir, server.host) == (tmp_path / "model", tmp_path / "run", "0.0.0.0")
    assert (server.http_port, server.grpc_port, server.metrics_port) == (8000, 8001, 8002)
    assert (server.prefill_workers, server.decode_workers, server.routing_mode) == (1, 1, "kv")
    assert (server.min_remote_prefill_tokens, server.block_size, server.llm_instances) == (512, 16, 2)
    assert (server.num_blocks, server.max_num_batched_tokens, server.prefill_max_num_batched_tokens) == (None, 512, None)
    frontend = local.frontend
    assert (frontend.triton_url, frontend.port, frontend.served_model_name, frontend.api_keys) == (
        "localhost:8001", 8080, "tiny-llama", ("k1",)
    )
    plan = _build_parser().parse_args(list(local.planner_args))
    assert (plan.connector, plan.policy, plan.interval_s) == ("triton", "load", 10.0)
    assert (plan.http_url, plan.metrics_url) == ("http://localhost:8000", "http://localhost:8002/metrics")
    assert plan.model_repository == str(tmp_path / "run" / "model_repository")
    assert (plan.min_prefill_workers, plan.max_prefill_workers, plan.min_decode_workers, plan.max_decode_workers) == (1, 2, 1, 2)
    assert (plan.devices_per_prefill_worker, plan.devices_per_decode_worker, plan.device_budget) == (1, 1, 4)


def test_router_kv_and_step_settings_reach_the_server(tmp_path):
    spec = spec_with(
        block_size=32,
        max_model_len=256,
        router={"mode": "round_robin", "min_remote_prefill_tokens": 0, "prefill_busy_tokens": 64, "kv_pull_timeout_s": 5},
        pools=[
            {"role": "prefill", "replicas": {"initial": 2, "max": 3}, "kv": {"num_blocks": 128}, "max_num_batched_tokens": 1024},
            {"role": "decode", "replicas": {"initial": 3, "max": 3}, "kv": {"num_blocks": 128}, "max_num_batched_tokens": 256},
        ],
    )
    server = local_deployment(spec, model_path=tmp_path).server
    assert (server.block_size, server.max_model_len, server.num_blocks) == (32, 256, 128)
    assert (server.routing_mode, server.min_remote_prefill_tokens, server.prefill_busy_tokens) == ("round_robin", 0, 64)
    assert (server.kv_pull_timeout_s, server.prefill_workers, server.decode_workers) == (5.0, 2, 3)
    assert (server.max_num_batched_tokens, server.prefill_max_num_batched_tokens) == (256, 1024)


def test_an_aggregated_pool_serves_with_no_prefill_worker_and_no_planner(tmp_path):
    spec = spec_with(pools=[{"role": "aggregated", "replicas": {"initial": 2, "max": 2}}], planner={"policy": "off"})
    local = local_deployment(spec, model_path=tmp_path)
    assert (local.server.prefill_workers, local.server.decode_workers, local.planner_args) == (0, 2, None)


def test_a_server_on_its_own_address_binds_and_is_reached_there(tmp_path):
    data = yaml.safe_load((EXAMPLES_DIR / "cpu-laptop.yaml").read_text())
    data["servers"][0]["address"] = "127.0.0.2"
    data["frontend"]["port"] = 0
    local = local_deployment(parse_spec(data), model_path=tmp_path)
    assert (local.server.http_url, local.server.metrics_url, local.frontend) == ("http://127.0.0.2:8000", "http://127.0.0.2:8002/metrics", None)
    assert _address_args("127.0.0.2") == ["--http-address=127.0.0.2", "--grpc-address=127.0.0.2", "--metrics-address=127.0.0.2"]
    assert _address_args("0.0.0.0") == []


@pytest.mark.parametrize(
    ("example", "message"),
    [
        ("multi-node-tp.yaml", "models[0].pools[0].parallelism.nodes_per_replica: the engine has no tensor parallelism yet"),
        ("one-node-8gpu.yaml", "models[0].pools[0].parallelism.tensor_parallel_size: the engine has no tensor parallelism yet"),
    ],
)
def test_what_one_server_cannot_run_is_refused_naming_the_field(example, message):
    with pytest.raises(NotSupportedYet, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_runs_on_one_machine(load_spec(EXAMPLES_DIR / example))


def test_the_multi_server_spec_maps_onto_an_entry_server_and_two_worker_servers(tmp_path):
    local = local_deployment(load_spec(EXAMPLES_DIR / "local-multi-server.yaml"), model_path=tmp_path, run_dir=tmp_path / "run")
    entry, (prefill, decode) = local.server, local.worker_servers
    assert (entry.host, entry.is_entry, entry.has_worker_servers, entry.worker_names) == ("127.0.0.1", True, True, [])
    assert (entry.run_dir, prefill.run_dir, decode.run_dir) == (tmp_path / "run" / "entry", tmp_path / "run" / "prefill", tmp_path / "run" / "decode")
    assert (prefill.host, prefill.entry_grpc_url, prefill.worker_names) == ("127.0.0.2", "127.0.0.1:8001", ["prefill_0"])
    assert (decode.host, decode.entry_grpc_url, decode.worker_names, decode.num_blocks) == ("127.0.0.3", "127.0.0.1:8001", ["decode_0"], 512)
    assert (prefill.num_blocks, decode.min_remote_prefill_tokens) == (None, 32)
    assert (local.frontend.triton_url, local.frontend.port, local.planner_args) == ("127.0.0.1:8001", 8080, None)


def test_multi_server_specs_the_launcher_cannot_run_are_refused_naming_the_field():
    data = yaml.safe_load((EXAMPLES_DIR / "local-multi-server.yaml").read_text())
    data["models"][0]["planner"] = {"policy": "load"}
    with pytest.raises(NotSupportedYet, match=r"models\[0\]\.planner: a planner of pools in several Triton servers"):
        check_runs_on_one_machine(parse_spec(data))
    data["models"][0]["planner"] = {"policy": "off"}
    data["models"][0]["pools"][0]["server"] = "decode"
    with pytest.raises(ValueError, match=r"servers\[1\]: no model or pool runs in server 'prefill'; give it a pool or remove it"):
        check_runs_on_one_machine(parse_spec(data))


def test_a_worker_server_needs_an_address_of_its_own(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    config = ServerConfig(model_path=tmp_path, entry_grpc_url="127.0.0.1:8001", decode_workers=1)
    with pytest.raises(ValueError, match="host: a worker server is reached by the entry server at its own address"):
        config.validate()


def test_pools_with_different_kv_settings_are_refused():
    spec = spec_with(pools=[{"role": "prefill", "kv": {"num_blocks": 64}}, {"role": "decode", "kv": {"num_blocks": 128}}])
    with pytest.raises(NotSupportedYet, match=r"models\[0\]\.pools\[1\]\.kv\.num_blocks: pools with different KV settings"):
        check_runs_on_one_machine(spec)


def test_kv_tiers_reach_the_server_where_it_has_them(tmp_path):
    """The host and disk tiers map to the server's kv_host_blocks/kv_disk_path/kv_disk_blocks (serve's
    --kv-host-blocks, --kv-disk-path, --kv-disk-blocks); a server without them refuses the field."""
    kv = {"kv_host_blocks": 512, "kv_disk_path": str(tmp_path / "kv"), "kv_disk_blocks": 2048}
    spec = spec_with(pools=[{"role": "prefill", "kv": kv}, {"role": "decode", "kv": kv}])
    if {"kv_host_blocks", "kv_disk_path", "kv_disk_blocks"} <= SERVER_FIELDS:
        server = local_deployment(spec, model_path=tmp_path).server
        assert (server.kv_host_blocks, str(server.kv_disk_path), server.kv_disk_blocks) == (512, kv["kv_disk_path"], 2048)
    else:
        with pytest.raises(NotSupportedYet, match=r"models\[0\]\.pools\[0\]\.kv\.kv_host_blocks: this build's server has no --kv-host-blocks"):
            check_runs_on_one_machine(spec)


def test_a_kubernetes_planner_is_refused_on_one_machine():
    spec = spec_with(planner={"policy": "load", "connector": "kubernetes"})
    with pytest.raises(ValueError, match=r"models\[0\]\.planner\.connector: kubernetes scales StatefulSets"):
        check_runs_on_one_machine(spec)


def test_a_component_name_is_checked(tmp_path):
    spec = load_spec(EXAMPLES_DIR / "cpu-laptop.yaml")
    with pytest.raises(ValueError, match="--component 'tiny-llama/encode' is not a part of this deployment; use one of entry, "):
        check_runs_on_one_machine(spec, "tiny-llama/encode")
    with pytest.raises(ValueError, match="--component tiny-llama/decode runs one worker: pass --worker-id N"):
        component_deployment(spec, "tiny-llama/decode", model_path=tmp_path)


def test_the_entry_component_runs_every_models_entry_server_and_the_frontend_with_no_worker(tmp_path):
    spec = load_spec(EXAMPLES_DIR / "two-models.yaml")
    local = component_deployment(spec, "entry", model_path=tmp_path / "llama", run_dir=tmp_path / "run")
    assert [(m.name, m.server.grpc_url, m.server.worker_names, m.planner_args) for m in local.models] == [
        ("tiny-llama", "127.0.0.1:8001", [], None),
        ("tiny-mixtral", "127.0.0.1:8101", [], None),
    ]
    assert all(m.server.is_entry and m.server.has_worker_servers for m in local.models)
    assert local.frontend.more_models == (("tiny-mixtral", "127.0.0.1:8101"),) and local.announce_to is None


def test_a_pool_component_runs_one_worker_that_joins_its_entry_and_advertises_the_pod_address(tmp_path):
    spec = load_spec(EXAMPLES_DIR / "two-nodes.yaml")
    model, pool = spec.models[0], spec.models[0].pools_of(Role.DECODE)[0]
    local = component_deployment(
        spec, f"{model.name}/{pool.pool_name}", model_path=tmp_path, worker_id=3, entry_host="td-entry", advertise_host="10.0.0.7"
    )
    (only,) = local.models
    server = only.server
    assert (server.worker_names, server.entry_grpc_url, server.grpc_url) == (["decode_3"], "td-entry:8001", "10.0.0.7:8001")
    assert (server.host, local.frontend, local.announce_to) == ("0.0.0.0", None, "http://td-entry:8000")
    with pytest.raises(ValueError, match="host: a worker server is reached by the entry server at its own address"):
        dataclasses.replace(server, advertise_host=None, model_path=_checkpoint(tmp_path)).validate()


def _checkpoint(path: Path) -> Path:
    (path / "config.json").write_text("{}")
    return path


def test_serve_flags_pick_the_model_spec_then_flag(tmp_path):
    spec_path = tmp_path / "deploy.yaml"
    data = yaml.safe_load((EXAMPLES_DIR / "cpu-laptop.yaml").read_text())
    data["models"][0]["path"] = str(tmp_path / "from-spec")
    spec_path.write_text(yaml.safe_dump(data))
    args = _build_parser().parse_args(["serve", "--deployment", str(spec_path), "--run-dir", str(tmp_path / "run")])
    assert deployment_for_serve(args).server.model_path == tmp_path / "from-spec"
    args = _build_parser().parse_args(["serve", "--deployment", str(spec_path), "--model", str(tmp_path / "flag")])
    assert deployment_for_serve(args).server.model_path == tmp_path / "flag"


def test_serve_exits_naming_what_it_cannot_run(capsys):
    from triton_disagg.cli.main import main

    assert main(["serve", "--deployment", str(EXAMPLES_DIR / "multi-node-tp.yaml")]) == 1
    assert "models[0].pools[0].parallelism.nodes_per_replica: the engine has no tensor parallelism yet" in capsys.readouterr().err
    assert main(["serve", "--component", "entry"]) == 1
    assert "--component and --worker-id name a part of a deployment: pass --deployment FILE too" in capsys.readouterr().err


def test_expert_parallelism_reaches_the_server_as_ep_size(tmp_path):
    pools = [
        {"role": "prefill", "parallelism": {"expert_parallel_size": 2}},
        {"role": "decode", "parallelism": {"expert_parallel_size": 2}},
    ]
    assert local_deployment(spec_with(pools=pools), model_path=tmp_path).server.ep_size == 2
    pools[0]["parallelism"] = {"expert_parallel_size": 4}
    with pytest.raises(NotSupportedYet, match=r"models\[0\]\.pools\[1\]\.parallelism\.expert_parallel_size: pools with different"):
        local_deployment(spec_with(pools=pools), model_path=tmp_path)


def test_two_models_map_onto_their_own_servers_and_one_frontend_routing_by_model(tmp_path):
    spec = load_spec(EXAMPLES_DIR / "two-models.yaml")
    local = local_deployment(spec, model_path=tmp_path / "llama", run_dir=tmp_path / "run")
    llama, mixtral = local.models
    assert (llama.name, llama.server.grpc_url, llama.server.worker_names) == ("tiny-llama", "127.0.0.1:8001", ["prefill_0", "decode_0"])
    assert (mixtral.name, mixtral.server.grpc_url, mixtral.server.worker_names) == ("tiny-mixtral", "127.0.0.1:8101", ["decode_0"])
    assert (llama.server.model_path, mixtral.server.model_path) == (tmp_path / "llama", Path("models/tiny-mixtral"))
    assert (llama.server.run_dir, mixtral.server.run_dir) == (tmp_path / "run" / "llama", tmp_path / "run" / "mixtral")
    assert llama.worker_servers == mixtral.worker_servers == ()
    # Each its own planner, on its own server and metrics port.
    assert "127.0.0.1:8000" in " ".join(llama.planner_args) and "9091" in llama.planner_args
    assert "127.0.0.1:8100" in " ".join(mixtral.planner_args) and "9092" in mixtral.planner_args
    assert (local.frontend.triton_url, local.frontend.served_model_name) == ("127.0.0.1:8001", "tiny-llama")
    assert local.frontend.more_models == (("tiny-mixtral", "127.0.0.1:8101"),)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["models"][1].pop("server"), r"models\[1\]\.server: server 'llama' already runs model 'tiny-llama'"),
        (lambda d: d["models"][1]["pools"][0].pop("server"), r"models\[1\]\.pools\[0\]\.server: server 'llama' already runs model 'tiny-llama'"),
        (lambda d: d["models"][1]["planner"].update(metrics_port=9091), r"models\[1\]\.planner\.metrics_port: 9091 is also model 'tiny-llama'"),
        (lambda d: d["models"][0].update(server="mixtral"), r"models\[0\]\.server: the first model's entry server is the frontend's"),
    ],
)
def test_models_side_by_side_that_would_share_a_server_or_port_are_refused_naming_the_field(change, message):
    data = yaml.safe_load((EXAMPLES_DIR / "two-models.yaml").read_text())
    change(data)
    with pytest.raises(ValueError, match=message):
        check_runs_on_one_machine(parse_spec(data))


def test_a_model_server_must_be_declared():
    data = yaml.safe_load((EXAMPLES_DIR / "two-models.yaml").read_text())
    data["models"][1]["server"] = "nowhere"
    with pytest.raises(SpecError, match=r"models\[1\]\.server: 'nowhere' is not one of the servers"):
        parse_spec(data)
