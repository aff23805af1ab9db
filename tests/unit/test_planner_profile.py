"""Profile data: interpolation, TTFT/ITL limits, JSON round trip, clear errors."""

from __future__ import annotations

import json

import pytest

from triton_disagg.planner.profile import (
    DecodeProfile,
    PerformanceProfile,
    PrefillProfile,
    bilinear,
    interpolate,
)


def make_profile() -> PerformanceProfile:
    """Prefill TTFT L * (b + 1) / 20 ms; decode ITL 13 + 2c ms at context 11000 (see test_planner_core)."""
    return PerformanceProfile(
        model="test-model",
        device_kind="cpu",
        devices_per_worker=1,
        prefill=PrefillProfile((1000.0, 21000.0), (1.0, 4.0), ((100.0, 250.0), (2100.0, 5250.0))),
        decode=DecodeProfile((1.0, 32.0), (1000.0, 21000.0), ((10.0, 20.0), (46.0, 108.0))),
    )


def test_interpolate_linear_inside_and_held_outside():
    assert interpolate([0.0, 10.0], [100.0, 200.0], 2.5) == 125.0
    assert interpolate([0.0, 10.0], [100.0, 200.0], -5.0) == 100.0
    assert interpolate([0.0, 10.0], [100.0, 200.0], 50.0) == 200.0


def test_bilinear_at_the_centre_is_the_mean_of_the_corners():
    """(10 + 20 + 46 + 108) / 4 = 46."""
    assert bilinear([1.0, 32.0], [1000.0, 21000.0], [[10.0, 20.0], [46.0, 108.0]], 16.5, 11000.0) == 46.0


def test_prefill_batch_and_throughput_within_ttft():
    """At 10900 tokens TTFT is 545 * (b + 1): 1090, 1635, 2180 ms; within 2000 ms the batch is 2,
    prefilling 2 * 10900 / 1.635 s = 13333.3 tokens/s. Within 1000 ms not even one prompt fits."""
    prefill = make_profile().prefill
    assert prefill.ttft_at_ms(10900, 2) == pytest.approx(1635.0)
    assert prefill.max_batch_within(10900, 2000.0) == 2
    assert prefill.throughput_tokens_per_s(10900, 2) == pytest.approx(13333.33, rel=1e-6)
    assert prefill.max_batch_within(10900, 1000.0) is None


def test_decode_max_concurrency_within_itl():
    """ITL 13 + 2c ms at 11000 tokens: <= 50 ms up to c = 18 (49 ms); c = 19 is 51 ms."""
    decode = make_profile().decode
    assert decode.itl_at_ms(18, 11000) == pytest.approx(49.0)
    assert decode.max_concurrency_within(11000, 50.0) == 18
    assert decode.max_concurrency_within(11000, 10.0) is None


def test_json_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    make_profile().save(path)
    assert PerformanceProfile.load(path) == make_profile()


def test_saturating_batch_tokens_round_trips_and_is_optional(tmp_path):
    profile = make_profile()
    with_budget = PerformanceProfile(
        profile.model,
        profile.device_kind,
        profile.devices_per_worker,
        PrefillProfile(profile.prefill.input_tokens, profile.prefill.batch_sizes, profile.prefill.ttft_ms, 256),
        profile.decode,
    )
    path = tmp_path / "profile.json"
    with_budget.save(path)
    assert json.loads(path.read_text())["prefill"]["saturating_batch_tokens"] == 256
    assert PerformanceProfile.load(path).prefill.saturating_batch_tokens == 256
    # A file written before the field existed still loads.
    assert "saturating_batch_tokens" not in profile.to_dict()["prefill"]
    assert PerformanceProfile.from_dict(profile.to_dict()).prefill.saturating_batch_tokens is None


def test_missing_profile_file_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="does not exist; run `triton-disagg profile`"):
        PerformanceProfile.load(tmp_path / "absent.json")


def test_missing_section_names_the_field(tmp_path):
    data = make_profile().to_dict()
    del data["decode"]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="profile is missing 'decode'"):
        PerformanceProfile.load(path)


@pytest.mark.parametrize(
    ("prefill", "message"),
    [
        (dict(input_tokens=(2000.0, 1000.0)), r"prefill.input_tokens must be positive and strictly ascending"),
        (dict(ttft_ms=((100.0,), (2100.0, 5250.0))), r"prefill grid must be 2 rows"),
        (dict(ttft_ms=((100.0, 0.0), (2100.0, 5250.0))), r"latencies must be finite and > 0"),
    ],
)
def test_bad_grids_are_rejected(prefill, message):
    fields = dict(input_tokens=(1000.0, 21000.0), batch_sizes=(1.0, 4.0), ttft_ms=((100.0, 250.0), (2100.0, 5250.0)))
    fields.update(prefill)
    with pytest.raises(ValueError, match=message):
        PrefillProfile(**fields)


def test_unknown_device_kind_in_profile():
    data = make_profile().to_dict()
    data["device_kind"] = "abacus"
    with pytest.raises(ValueError, match="device_kind 'abacus' is unknown"):
        PerformanceProfile.from_dict(data)
