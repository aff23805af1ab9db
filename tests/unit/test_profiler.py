"""The profiler: the saturating-batch choice, a real (tiny) sweep, its file, and `serve --profile`."""

from __future__ import annotations

import json

import pytest

from triton_disagg.planner.profile import PerformanceProfile
from triton_disagg.cli.main import main
from triton_disagg.launch.flags import prefill_budget_from_profile
from triton_disagg.launch.server import ServerConfig, render_model_repository
from triton_disagg.tools.profiler import ProfileResult, ProfileSettings, run_profile, smallest_saturating_batch, write_outputs


def tiny_settings(model_path, **overrides) -> ProfileSettings:
    """A grid small enough to run in a few seconds on two cores."""
    fields = dict(
        model_path=str(model_path),
        device="cpu",
        prefill_token_budgets=(16, 64, 256),
        prefill_input_tokens=64,
        prefill_sweep_tokens=256,
        ttft_input_tokens=(16, 64),
        ttft_batch_sizes=(1, 2),
        decode_concurrency=(1, 4),
        decode_context_tokens=(16, 64),
        decode_steps=2,
        repeats=1,
    )
    fields.update(overrides)
    return ProfileSettings(**fields)


def chosen_from_sweep(result: ProfileResult) -> int:
    """The budget `smallest_saturating_batch` picks from the sweep `result` recorded."""
    budgets = [budget for budget, _ in result.prefill_sweep]
    return smallest_saturating_batch(budgets, [rate for _, rate in result.prefill_sweep], result.settings.saturation)


# A CPU prefill curve: peak 35200 tokens/s at 256, so 95% of it is 33440 tokens/s.
BUDGETS = [16, 32, 64, 128, 256, 512, 1024, 2048]
TOKENS_PER_S = [8300.0, 9750.0, 22600.0, 30800.0, 35200.0, 34700.0, 27600.0, 24700.0]


def test_smallest_saturating_batch_is_the_first_within_95_percent_of_peak():
    """128 gives 30800 < 33440; 256 (the peak) is the first to reach it; 512 (34700) does too but is larger."""
    assert smallest_saturating_batch(BUDGETS, TOKENS_PER_S) == 256


def test_smallest_saturating_batch_can_be_below_the_peak_batch():
    """Peak 100 at 1024; 95% is 95: 256 gives exactly 95 and counts, 128 gives 94.9 and does not."""
    assert smallest_saturating_batch([128, 256, 512, 1024], [94.9, 95.0, 99.0, 100.0]) == 256


def test_smallest_saturating_batch_ignores_order_and_takes_the_fraction():
    """Peak 200 at 64; at 0.5 the threshold is 100: 16 (80) misses, 32 (100) makes it."""
    assert smallest_saturating_batch([64, 16, 32], [200.0, 80.0, 100.0], saturation=0.5) == 32
    assert smallest_saturating_batch([64, 16, 32], [200.0, 80.0, 100.0], saturation=1.0) == 64


@pytest.mark.parametrize(
    ("batches", "rates", "saturation", "message"),
    [
        ([], [], 0.95, "one throughput per batch"),
        ([16, 32], [1.0], 0.95, "one throughput per batch"),
        ([16], [0.0], 0.95, "throughputs must be > 0"),
        ([16], [1.0], 0.0, r"saturation must be in \(0, 1\]"),
        ([16], [1.0], 1.5, r"saturation must be in \(0, 1\]"),
    ],
)
def test_smallest_saturating_batch_rejects_bad_input(batches, rates, saturation, message):
    with pytest.raises(ValueError, match=message):
        smallest_saturating_batch(batches, rates, saturation)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(prefill_token_budgets=(64, 16)), "prefill_token_budgets must be positive and strictly ascending"),
        (dict(decode_steps=0), "decode_steps must be >= 1"),
        (dict(device_kind="abacus"), "device_kind 'abacus' is unknown"),
        (dict(decode_context_tokens=(4096,)), "decode_context_tokens needs 4101 tokens of context but the model's"),
    ],
)
def test_bad_settings_are_refused_before_measuring(tiny_model, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_profile(tiny_settings(tiny_model, **overrides), progress=lambda message: None)


def test_profile_of_the_tiny_model_loads_as_a_planner_profile(tiny_model, tmp_path):
    messages: list[str] = []
    result = run_profile(tiny_settings(tiny_model), progress=messages.append)
    write_outputs(result, tmp_path / "profile.json", tmp_path / "profile.png")

    profile = PerformanceProfile.load(tmp_path / "profile.json")
    assert profile == result.profile
    assert (profile.model, profile.device_kind, profile.devices_per_worker) == (tiny_model.name, "cpu", 1)
    assert profile.prefill.input_tokens == (16.0, 64.0)
    assert profile.prefill.batch_sizes == (1.0, 2.0)
    assert profile.decode.concurrency == (1.0, 4.0)
    assert profile.decode.context_tokens == (16.0, 64.0)
    raw = json.loads((tmp_path / "profile.json").read_text())
    assert raw["prefill_token_sweep"]["batch_tokens"] == [16, 64, 256]
    assert profile.prefill.saturating_batch_tokens == chosen_from_sweep(result)
    assert (tmp_path / "profile.png").read_bytes().startswith(b"\x89PNG")
    # One line per sweep point, and one for the choice: 3 budgets, 1 choice, 2x2 TTFT, 2x2 ITL.
    assert len(messages) == 3 + 1 + 4 + 4
    assert messages[3].startswith("smallest budget within 95% of the peak:")


def test_cli_profile_then_serve_renders_prefill_with_the_saturating_budget(tiny_model, tmp_path, capsys, monkeypatch):
    results: list[ProfileResult] = []

    def run_and_keep(settings, progress=None):
        results.append(run_profile(settings, progress))
        return results[-1]

    # The file rounds throughputs, so the choice is checked against the unrounded sweep the CLI ran.
    monkeypatch.setattr("triton_disagg.tools.profiler.run_profile", run_and_keep)
    output = tmp_path / "out" / "profile.json"
    code = main([
        "profile", "--model", str(tiny_model), "--device", "cpu", "--prefill-token-budgets", "16,32",
        "--prefill-input-tokens", "32", "--ttft-input-tokens", "16", "--ttft-batch-sizes", "1",
        "--decode-concurrency", "1", "--decode-context-tokens", "16", "--decode-steps", "1", "--repeats", "1",
        "--output", str(output),
    ])
    assert code == 0
    assert output.with_suffix(".png").is_file()
    budget = prefill_budget_from_profile(output)
    assert [b for b, _ in results[0].prefill_sweep] == [16, 32]
    assert budget == chosen_from_sweep(results[0])
    assert f"serve --profile {output}" in capsys.readouterr().out

    config = ServerConfig(model_path=tiny_model, run_dir=tmp_path / "run", prefill_max_num_batched_tokens=budget)
    repository = render_model_repository(config, tmp_path / "repository")
    assert f'key: "max_num_batched_tokens" value: {{ string_value: "{budget}" }}' in (
        repository / "prefill" / "config.pbtxt"
    ).read_text()
    assert 'key: "max_num_batched_tokens" value: { string_value: "512" }' in (
        repository / "decode" / "config.pbtxt"
    ).read_text()


def test_serve_refuses_a_profile_without_a_saturating_budget(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(_old_profile_dict()))
    with pytest.raises(ValueError, match="has no saturating_batch_tokens; re-run `triton-disagg profile`"):
        prefill_budget_from_profile(path)


def _old_profile_dict() -> dict:
    """A version-1 file written before the saturating budget was recorded."""
    return {
        "version": 1,
        "model": "tiny-llama",
        "device_kind": "cpu",
        "prefill": {"input_tokens": [64], "batch_sizes": [1], "ttft_ms": [[5.0]]},
        "decode": {"concurrency": [1], "context_tokens": [64], "itl_ms": [[2.0]]},
    }
