"""Rendering the model repository and preparing the backend directory (no server started)."""

import json
import re
from pathlib import Path

import pytest

from triton_disagg.serving.settings import (
    engine_config,
    grpc_url,
    llm_settings,
    min_remote_prefill_tokens,
    model_parameters,
)
from triton_disagg.router.config import RouterConfig, RoutingMode
from triton_disagg.serving.live_workers import MODEL_CONTROL_KEY_ENV
from triton_disagg.launch.server import (
    ServerConfig,
    _restricted_api_args,
    _server_environment,
    find_tritonserver,
    prepare_backend_directory,
    render_model_repository,
    set_instance_count,
    set_parameter,
)
from triton_disagg.model_control import Placement, worker_config, write_worker

PBTXT = """\
instance_group [ { count: 2 kind: KIND_CPU } ]
parameters: { key: "model_path" value: { string_value: "" } }
parameters: { key: "block_size" value: { string_value: "16" } }
"""


def fake_checkpoint(path: Path, max_position_embeddings: int = 4096) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(f'{{"max_position_embeddings": {max_position_embeddings}}}')
    (path / "tokenizer.json").write_text("{}")
    return path


def test_set_parameter_replaces_only_its_key():
    rendered = set_parameter(PBTXT, "block_size", "32")
    assert 'key: "block_size" value: { string_value: "32" }' in rendered
    assert 'key: "model_path" value: { string_value: "" }' in rendered


def test_set_parameter_escapes_quotes():
    assert r'string_value: "/a \"b\""' in set_parameter(PBTXT, "model_path", '/a "b"')


def test_set_parameter_missing_key():
    with pytest.raises(ValueError, match="'num_blocks' 0 times"):
        set_parameter(PBTXT, "num_blocks", "8")


def test_set_instance_count():
    assert "count: 5 kind: KIND_CPU" in set_instance_count(PBTXT, 5)


def test_render_model_repository(tmp_path):
    model = fake_checkpoint(tmp_path / "model")
    config = ServerConfig(model_path=model, run_dir=tmp_path, block_size=8, num_blocks=64, llm_instances=3)
    repository = render_model_repository(config, tmp_path / "repo")
    assert sorted(p.name for p in repository.iterdir()) == ["decode", "kv_transfer", "llm", "prefill", "router"]
    assert (repository / "llm" / "1" / "model.py").is_file()
    llm = (repository / "llm" / "config.pbtxt").read_text()
    assert "count: 3 kind: KIND_CPU" in llm
    for template in ("prefill", "decode"):
        worker = (repository / template / "config.pbtxt").read_text()
        assert f'key: "model_path" value: {{ string_value: "{model}" }}' in worker
        assert 'key: "num_blocks" value: { string_value: "64" }' in worker


def test_rendered_parameters_parse_into_settings(tmp_path):
    """The parameters the launcher writes are the ones the models read."""
    model = fake_checkpoint(tmp_path / "model", max_position_embeddings=1024)
    config = ServerConfig(model_path=model, run_dir=tmp_path, block_size=8, num_blocks=64, max_num_batched_tokens=128)
    repository = render_model_repository(config, tmp_path / "repo")
    decode_parameters = _parameters_of(repository / "decode" / "config.pbtxt")
    engine = engine_config(decode_parameters)
    assert (engine.block_size, engine.num_blocks, engine.max_num_batched_tokens) == (8, 64, 128)
    assert engine.max_model_len is None
    assert min_remote_prefill_tokens(decode_parameters) == 512
    assert engine_config(_parameters_of(repository / "prefill" / "config.pbtxt")).kv_hold_timeout_s == 30.0
    llm = llm_settings(_parameters_of(repository / "llm" / "config.pbtxt"))
    assert (llm.model_path, llm.max_model_len) == (model, 1024)
    assert (llm.route_wait_s, llm.migration_limit, llm.max_tokens_limit) == (10.0, 3, None)
    router = RouterConfig.from_mapping(_parameters_of(repository / "router" / "config.pbtxt"))
    assert (router.mode, router.block_size) == (RoutingMode.KV, 8)
    assert decode_parameters["kv_events_dir"] == str(tmp_path.resolve() / "kv_events")


def _serve_args(argv: list[str]):
    import argparse

    from triton_disagg.launch.flags import EnvFlags, add_serve_flags

    parser = argparse.ArgumentParser()
    add_serve_flags(EnvFlags(parser))
    return parser.parse_args(argv)


def test_tier_flags_reach_the_workers_engine_config(tmp_path, monkeypatch):
    from triton_disagg.launch.flags import server_config

    model = fake_checkpoint(tmp_path / "model")
    monkeypatch.setenv("TRITON_DISAGG_KV_DISK_BLOCKS", "300")
    args = _serve_args(["--model", str(model), "--kv-host-blocks", "128", "--kv-disk-path", str(tmp_path / "kv")])
    config = server_config(args)
    assert (config.kv_host_blocks, config.kv_disk_path, config.kv_disk_blocks) == (128, tmp_path / "kv", 300)
    repository = render_model_repository(config, tmp_path / "repo")
    for template in ("prefill", "decode"):
        engine = engine_config(_parameters_of(repository / template / "config.pbtxt"))
        assert (engine.kv_host_blocks, engine.kv_disk_path, engine.kv_disk_blocks) == (128, str(tmp_path / "kv"), 300)
    defaults = engine_config(_parameters_of(render_model_repository(ServerConfig(model_path=model), tmp_path / "r2") / "decode" / "config.pbtxt"))
    assert (defaults.kv_host_blocks, defaults.kv_disk_path, defaults.kv_disk_blocks) == (None, "", None)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"kv_host_blocks": -1}, "kv_host_blocks must be >= 0"),
        ({"kv_disk_blocks": -5}, "kv_disk_blocks must be >= 0"),
        ({"kv_host_blocks": 0, "kv_disk_path": Path("/tmp/kv")}, "the disk tier needs the host tier"),
    ],
)
def test_bad_tier_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ServerConfig(model_path=fake_checkpoint(tmp_path / "model"), **overrides).validate()


def test_expert_parallel_settings_reach_both_worker_templates(tmp_path):
    model = fake_checkpoint(tmp_path / "model")
    config = ServerConfig(model_path=model, run_dir=tmp_path, ep_size=4, eplb_redundant_experts=4, eplb_interval=50,
                          eplb_window=200, eplb_threshold=0.9)
    repository = render_model_repository(config, tmp_path / "repo")
    for template in ("prefill", "decode"):
        engine = engine_config(_parameters_of(repository / template / "config.pbtxt"))
        assert (engine.ep_size, engine.eplb_redundant_experts, engine.eplb_interval, engine.eplb_window) == (4, 4, 50, 200)
        assert engine.eplb_threshold == 0.9
    defaults = engine_config(_parameters_of(render_model_repository(ServerConfig(model_path=model), tmp_path / "r2") / "decode" / "config.pbtxt"))
    assert (defaults.ep_size, defaults.eplb_redundant_experts, defaults.eplb_interval) == (1, 0, 0)


def test_reliability_settings_reach_the_llm_model(tmp_path):
    model = fake_checkpoint(tmp_path / "model")
    config = ServerConfig(model_path=model, run_dir=tmp_path, route_wait_s=0.5, migration_limit=0, max_tokens_limit=256)
    llm = llm_settings(_parameters_of(render_model_repository(config, tmp_path / "repo") / "llm" / "config.pbtxt"))
    assert (llm.route_wait_s, llm.migration_limit, llm.max_tokens_limit) == (0.5, 0, 256)
    # The template's own empty parameters take the defaults.
    defaults = llm_settings({"model_path": str(model), "route_wait_s": "", "migration_limit": "", "max_tokens_limit": ""})
    assert (defaults.route_wait_s, defaults.migration_limit, defaults.max_tokens_limit) == (10.0, 3, None)
    with pytest.raises(ValueError, match="parameter migration_limit must be >= 0"):
        llm_settings({"model_path": str(model), "migration_limit": "-1"})
    with pytest.raises(ValueError, match="migration_limit must be >= 0"):
        ServerConfig(model_path=model, migration_limit=-1).validate()


def test_workers_are_written_to_the_repository_to_load_with_the_server(tmp_path):
    repository = render_model_repository(ServerConfig(model_path=fake_checkpoint(tmp_path / "m")), tmp_path / "repo")
    target = write_worker(repository, "decode", "decode_1")
    assert (target / "1" / "model.py").is_file()
    config = (target / "config.pbtxt").read_text()
    assert 'name: "decode_1"' in config and "KIND_CPU" in config and "decoupled: true" in config


def test_worker_config_names_and_places_a_copy_of_the_template(tmp_path):
    repository = render_model_repository(ServerConfig(model_path=fake_checkpoint(tmp_path / "m")), tmp_path / "repo")
    config = json.loads(worker_config(repository / "decode", "decode_3", Placement(gpu=2), {"num_blocks": "7"}))
    assert config["name"] == "decode_3"
    assert config["instanceGroup"] == [{"count": 1, "kind": "KIND_GPU", "gpus": [2]}]
    assert config["parameters"]["num_blocks"] == {"stringValue": "7"}
    assert config["modelTransactionPolicy"] == {"decoupled": True}


@pytest.mark.parametrize(("parameters", "message"), [
    ({"block_size": "sixteen"}, "parameter block_size must be an integer"),
    ({"eplb_interval": "-1"}, "parameter eplb_interval must be an integer >= 0"),
    ({"ep_size": "0"}, "parameter ep_size must be >= 1"),
    ({"eplb_interval": "10"}, "set ep_size > 1 too"),
])
def test_bad_parameter_is_named(tmp_path, parameters, message):
    model = fake_checkpoint(tmp_path / "model")
    with pytest.raises(ValueError, match=message):
        engine_config({"model_path": str(model)} | parameters)


def test_backend_directory_holds_the_python_backend(tmp_path):
    backend_dir = prepare_backend_directory(find_tritonserver(), tmp_path / "backends")
    names = sorted(p.name for p in (backend_dir / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]


def test_config_rejects_clashing_ports(tmp_path):
    config = ServerConfig(model_path=fake_checkpoint(tmp_path / "m"), http_port=9000, grpc_port=9000)
    with pytest.raises(ValueError, match="must differ"):
        config.validate()


@pytest.mark.parametrize("key", ["", "with space", "tab\t", "caf\u00e9"])
def test_config_rejects_a_model_control_key_that_is_no_header_value(tmp_path, key):
    config = ServerConfig(model_path=fake_checkpoint(tmp_path / "m"), model_control_key=key)
    with pytest.raises(ValueError, match="model_control_key must be"):
        config.validate()


def test_the_model_control_key_restricts_both_protocols_and_reaches_the_models_by_environment(tmp_path, monkeypatch):
    key = "k3y=a:b"
    assert _restricted_api_args(key) == [
        "--http-restricted-api=model-repository:triton-disagg-key=k3y=a:b",
        "--grpc-restricted-protocol=model-repository:triton-disagg-key=k3y=a:b",
    ]
    assert _restricted_api_args(None) == []
    monkeypatch.setenv(MODEL_CONTROL_KEY_ENV, "from the shell")
    assert _server_environment(find_tritonserver(), key)[MODEL_CONTROL_KEY_ENV] == key
    assert MODEL_CONTROL_KEY_ENV not in _server_environment(find_tritonserver(), None)
    config = ServerConfig(model_path=fake_checkpoint(tmp_path / "m"), run_dir=tmp_path / "run", model_control_key=key)
    repository = render_model_repository(config, tmp_path / "repo")
    assert not [p for p in repository.rglob("*") if p.is_file() and key in p.read_text(errors="replace")]


def _parameters_of(pbtxt_path: Path) -> dict[str, str]:
    """Parse the `parameters` entries of a config.pbtxt (the format Triton hands `initialize`)."""
    found = re.findall(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', pbtxt_path.read_text())
    return model_parameters({"parameters": {key: {"string_value": value} for key, value in found}})


def test_every_model_that_calls_another_is_given_the_servers_grpc_endpoint(tmp_path):
    # BLS is not thread-safe in Triton 2.51's Python backend (see serving.model_calls).
    config = ServerConfig(model_path=fake_checkpoint(tmp_path / "ckpt"), grpc_port=8123)
    repository = render_model_repository(config, tmp_path / "repo")
    for template in ("llm", "prefill", "decode"):
        assert grpc_url(_parameters_of(repository / template / "config.pbtxt")) == "localhost:8123", template
