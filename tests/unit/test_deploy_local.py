"""`serve --deployment`: a one-server, one-model spec as launcher settings; what needs more is refused by field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from triton_disagg.cli.deploy import deployment_for_serve
from triton_disagg.cli.main import _build_parser
from triton_disagg.deploy.load import load_spec, parse_spec
from triton_disagg.launch.deployment import NotSupportedYet, check_runs_on_one_machine, local_deployment
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
        ("local-multi-server.yaml", "servers: 3 Triton servers; serving across several servers is not supported yet"),
        ("multi-node-tp.yaml", "models: 2 models side by side are not supported yet"),
        ("one-node-8gpu.yaml", "models[0].pools[0].parallelism.tensor_parallel_size: the engine has no tensor parallelism yet"),
    ],
)
def test_what_one_server_cannot_run_is_refused_naming_the_field(example, message):
    with pytest.raises(NotSupportedYet, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_runs_on_one_machine(load_spec(EXAMPLES_DIR / example))


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


def test_a_component_is_checked_then_refused_for_now():
    spec = load_spec(EXAMPLES_DIR / "cpu-laptop.yaml")
    with pytest.raises(ValueError, match="--component 'tiny-llama/encode' is not a part of this deployment; use one of entry, "):
        check_runs_on_one_machine(spec, "tiny-llama/encode")
    with pytest.raises(NotSupportedYet, match="--component tiny-llama/decode: running one part of a deployment"):
        check_runs_on_one_machine(spec, "tiny-llama/decode")


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

    assert main(["serve", "--deployment", str(EXAMPLES_DIR / "local-multi-server.yaml")]) == 1
    assert "servers: 3 Triton servers; serving across several servers is not supported yet" in capsys.readouterr().err
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
