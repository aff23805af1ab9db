"""The pure parts of `triton-disagg bench`: trace scaling, AIPerf command lines, configs, result parsing."""

import argparse
import json

import pytest

from triton_disagg.tools.bench import (
    PRESETS,
    BenchError,
    Scenario,
    Target,
    aiperf_command,
    configs_from_args,
    local_hub_entry,
    read_run,
    scale_trace,
)

TARGET = Target(url="http://localhost:8080", model="tiny-llama", tokenizer="local/tiny-llama", api_key="k")


def write_trace(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_scale_trace_divides_lengths_and_keeps_prefix_blocks(tmp_path):
    """Scale 32: a 512-token block becomes 16 tokens. 1000 input tokens -> ceil(1000/32) = 32 tokens
    (two blocks' worth, within its 2 hash ids); 100 output -> ceil(100/32) = 4. The second record has
    5 blocks but max_input_tokens 48 keeps 3 blocks (48 tokens): ceil(2500/32) = 79 is cut to 48.
    Timestamps start at 0 and are divided by speedup 2: (1500 - 500) / 2 = 500 ms."""
    source = write_trace(
        tmp_path / "trace.jsonl",
        [
            {"timestamp": 500, "input_length": 1000, "output_length": 100, "hash_ids": [7, 8]},
            {"timestamp": 1500, "input_length": 2500, "output_length": 3000, "hash_ids": [7, 8, 9, 10, 11]},
            {"timestamp": 9000, "input_length": 10, "output_length": 1, "hash_ids": [12]},
        ],
    )
    info = scale_trace(
        source, tmp_path / "out.jsonl", num_requests=2, scale=32, max_input_tokens=48, max_output_tokens=64, speedup=2.0
    )
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert written == [
        {"timestamp": 0, "input_length": 32, "output_length": 4, "hash_ids": [7, 8]},
        {"timestamp": 500, "input_length": 48, "output_length": 64, "hash_ids": [7, 8, 9]},
    ]
    assert info == {"requests": 2, "duration_s": 0.5, "mean_input_tokens": 40.0, "mean_output_tokens": 34.0, "block_tokens": 16}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"scale": 30}, "must divide 512"), ({"speedup": 0}, "speedup"), ({"max_input_tokens": 8}, "below one block")],
)
def test_scale_trace_rejects_bad_settings(tmp_path, overrides, message):
    source = write_trace(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}])
    settings = dict(num_requests=1, scale=32, max_input_tokens=64, max_output_tokens=8, speedup=1.0) | overrides
    with pytest.raises(ValueError, match=message):
        scale_trace(source, tmp_path / "o.jsonl", **settings)


def flag_value(command, flag):
    return command[command.index(flag) + 1]


def test_sweep_command(tmp_path):
    scenario = Scenario("sweep", concurrency=(1, 4), requests_per_point=8, input_tokens=128, output_tokens=16)
    command = aiperf_command(TARGET, scenario, tmp_path)
    assert command[:2] == ["aiperf", "profile"] and "--streaming" in command
    assert flag_value(command, "--concurrency") == "1,4" and flag_value(command, "--request-count") == "8"
    assert flag_value(command, "--prompt-input-tokens-mean") == "128" and flag_value(command, "--prompt-output-tokens-mean") == "16"
    assert flag_value(command, "--api-key") == "k" and flag_value(command, "--output-artifact-dir") == str(tmp_path)
    assert flag_value(command, "--extra-inputs") == "ignore_eos:true" and "--use-server-token-count" in command


def test_rate_and_trace_commands(tmp_path):
    rate = aiperf_command(TARGET, Scenario("rate", request_rate=2.5, num_requests=20, input_tokens=64, output_tokens=8), tmp_path)
    assert flag_value(rate, "--request-rate") == "2.5" and flag_value(rate, "--request-count") == "20"
    assert "--concurrency" not in rate
    trace = aiperf_command(TARGET, Scenario("trace", trace_path=tmp_path / "t.jsonl", trace_block_tokens=16), tmp_path)
    assert flag_value(trace, "--custom-dataset-type") == "mooncake_trace"
    assert flag_value(trace, "--prompt-input-tokens-block-size") == "16" and "--fixed-schedule" in trace
    assert "--prompt-input-tokens-mean" not in trace


def bench_args(**overrides):
    return argparse.Namespace(**({"url": None, "config": None, "compare": None} | overrides))


def test_configs():
    assert configs_from_args(bench_args()) == {"default": ""}
    assert configs_from_args(bench_args(compare="router")) == PRESETS["router"]
    both = configs_from_args(bench_args(compare="disagg", config=["big=--decode-workers 2"]))
    assert list(both) == ["aggregated", "disaggregated", "big"] and both["big"] == "--decode-workers 2"
    assert configs_from_args(bench_args(url="http://x")) == {}
    with pytest.raises(ValueError, match="cannot be combined"):
        configs_from_args(bench_args(url="http://x", compare="disagg"))
    with pytest.raises(ValueError, match="NAME="):
        configs_from_args(bench_args(config=["no equals sign"]))


def test_read_run(tmp_path):
    export = {
        "request_count": {"unit": "requests", "avg": 12.0},
        "time_to_first_token": {"unit": "ms", "avg": 50.0, "p50": 40.5, "p90": 57.0, "p99": 93.6},
        "inter_token_latency": {"unit": "ms", "avg": 11.8, "p50": 11.9, "p90": 12.5},
        "request_throughput": {"unit": "requests/sec", "avg": 8.5},
        "output_token_throughput": {"unit": "tokens/sec", "avg": 186.5},
        "error_summary": [{"error_details": {"code": 500}, "count": 2}],
    }
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(export))
    result = read_run(tmp_path / "profile_export_aiperf.json", "kv", "sweep", 4)
    assert (result.config, result.scenario, result.concurrency, result.num_requests, result.num_errors) == ("kv", "sweep", 4, 12, 2)
    assert (result.ttft_p50_ms, result.ttft_p90_ms, result.ttft_p99_ms) == (40.5, 57.0, 93.6)
    assert (result.itl_p50_ms, result.itl_p90_ms) == (11.9, 12.5)
    assert (result.request_throughput_per_s, result.output_token_throughput_per_s) == (8.5, 186.5)
    assert result.is_complete
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(export | {"was_cancelled": True}))
    assert not read_run(tmp_path / "profile_export_aiperf.json", "kv", "rate").is_complete
    with pytest.raises(BenchError, match="wrote no"):
        read_run(tmp_path / "missing.json", "kv", "rate")


def test_local_hub_entry(tmp_path):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "tokenizer.json").write_text("{}")
    (model / "tokenizer_config.json").write_text("{}")
    assert local_hub_entry(model, tmp_path / "hub") == "local/my-model"
    repo = tmp_path / "hub" / "models--local--my-model"
    revision = (repo / "refs" / "main").read_text()
    assert sorted(p.name for p in (repo / "snapshots" / revision).iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    with pytest.raises(ValueError, match="no tokenizer.json"):
        local_hub_entry(tmp_path / "hub", tmp_path / "hub2")
