"""The dry-run connector: what a planner would load and unload."""

from __future__ import annotations

import pytest

from planner.connectors import DryRunConnector


def test_dry_run_records_loads_and_unloads_in_order():
    connector = DryRunConnector()
    assert connector.add_worker("decode") == "decode_1"
    assert connector.add_worker("prefill") == "prefill_0"
    assert connector.remove_worker("decode") == "decode_1"
    assert connector.remove_worker("prefill") == "prefill_0"
    assert connector.remove_worker("prefill") is None
    assert connector.log == [("load", "decode_1"), ("load", "prefill_0"), ("unload", "decode_1"), ("unload", "prefill_0")]
    assert connector.workers("decode") == ["decode_0"]


def test_unknown_pool_is_named():
    with pytest.raises(ValueError, match="pool must be one of prefill, decode, got 'encode'"):
        DryRunConnector().add_worker("encode")
