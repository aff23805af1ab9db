"""The planner loop against the dry-run connector: baseline, decision, refusals, startup checks.

Pages are in the format of Triton's metrics endpoint (see test_planner_scrape.py
for a captured one). One decode worker of 100 blocks with 80 free is at 20% KV
usage; with 10 free, at 90%, above the 80% high mark of PlannerConfig's
defaults, so the load policy asks for ceil(0.9 / 0.8) = 2 decode workers.
"""

from __future__ import annotations

import pytest

from triton_disagg.planner.config import PlannerConfig
from triton_disagg.planner.connectors import DryRunConnector
from triton_disagg.planner.core import Planner
from triton_disagg.planner.inventory import DeviceInventory, parse_inventory
from triton_disagg.planner.process import PlannerLoop
from triton_disagg.cli.plan import PlannerStartupError, PlanSettings, build_planner_loop


def page(num_started: int, num_free_blocks: int) -> str:
    return (
        f'triton_disagg_llm_requests_started_total{{model="llm"}} {num_started}\n'
        'triton_disagg_kv_blocks{model="decode_0"} 100\n'
        f'triton_disagg_kv_free_blocks{{model="decode_0"}} {num_free_blocks}\n'
    )


def make_loop(pages: list, inventory: str = "cpu:4", **overrides) -> tuple[PlannerLoop, DryRunConnector]:
    """A load-policy loop ticking at 0, 10, 20 ... s over `pages` (an exception in the list is raised by the fetch)."""
    config = PlannerConfig(**{"policy": "load", "min_prefill_workers": 0, "adjustment_interval_s": 10.0} | overrides)
    slots = DeviceInventory(parse_inventory(inventory))
    connector = DryRunConnector(sizes={"prefill": 0, "decode": 1}, inventory=slots)
    pages, times = list(pages), iter(range(0, 1000, 10))

    def fetch() -> str:
        item = pages.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return PlannerLoop(Planner(config), connector, fetch, inventory=slots, clock=lambda: float(next(times))), connector


def sample(loop: PlannerLoop, name: str, **labels: str) -> float | None:
    return loop.metrics.registry.get_sample_value(name, labels)


def test_first_scrape_is_a_baseline_then_high_kv_usage_loads_a_decode_worker():
    loop, connector = make_loop([page(0, 80), page(20, 10)])
    assert loop.tick() is None
    decision = loop.tick()
    assert (decision.num_decode_workers, decision.decode_reason) == (2, "scale_up")
    observation, _ = loop.history[-1]
    assert (observation.num_requests, observation.request_rate_per_s, observation.decode_kv_usage) == (20, 2.0, 0.9)
    assert connector.log == [("load", "decode_1")]
    assert loop.inventory.describe() == "cpu:0=decode_0 cpu:1=decode_1 cpu:2=free cpu:3=free"
    assert sample(loop, "triton_disagg_planner_desired_workers", pool="decode") == 2
    assert sample(loop, "triton_disagg_planner_actual_workers", pool="decode") == 2
    assert sample(loop, "triton_disagg_planner_decisions_total", pool="decode", reason="scale_up") == 1
    assert sample(loop, "triton_disagg_planner_decisions_total", pool="prefill", reason="steady") == 1


def test_an_unreachable_metrics_endpoint_refuses_the_tick(caplog):
    loop, connector = make_loop([page(0, 80), ConnectionError("connection refused"), page(20, 10)])
    loop.tick()
    assert loop.tick() is None
    assert "tick refused (metrics_unreachable): metrics endpoint unreachable: connection refused" in caplog.text
    assert sample(loop, "triton_disagg_planner_refused_ticks_total", reason="metrics_unreachable") == 1
    assert connector.log == []
    assert loop.tick().decode_reason == "scale_up"  # the next tick measures from the last good page


def test_a_decision_that_needs_more_slots_than_are_free_changes_nothing(caplog):
    loop, connector = make_loop([page(0, 80), page(20, 10), page(40, 10)], inventory="cpu:1", device_budget=2)
    loop.tick()
    assert loop.tick().num_decode_workers == 2
    assert "1 worker(s) to load but 0 device slot(s) free (cpu:0=decode_0); nothing changed" in caplog.text
    assert sample(loop, "triton_disagg_planner_refused_ticks_total", reason="no_free_device") == 1
    assert connector.log == []
    # The refused change never happened, so the next tick is neither in grace nor in cooldown: it asks again.
    assert loop.tick().decode_reason == "scale_up"


@pytest.mark.parametrize(
    ("settings", "config", "message"),
    [
        (PlanSettings(inventory="tpu:0"), PlannerConfig(policy="load"), "unknown device 'tpu'"),
        (
            PlanSettings(inventory="cpu:1"),
            PlannerConfig(policy="load"),
            r"the device inventory \(cpu:1\) has 1 slot\(s\) but the minimum pools need 2",
        ),
        (PlanSettings(), PlannerConfig(policy="slo"), "policy 'slo' needs profile data"),
        (PlanSettings(profile_path="/nonexistent/profile.json"), PlannerConfig(policy="slo"), "does not exist"),
        (PlanSettings(api_key_header="secret"), PlannerConfig(policy="load"), "api_key_header 'secret' must be NAME=VALUE"),
    ],
)
def test_bad_settings_stop_the_planner_before_it_connects(settings, config, message):
    def unreachable() -> str:
        raise AssertionError("a bad setting must be caught before the server is asked")

    with pytest.raises(ValueError, match=message):
        build_planner_loop(settings, config, fetch_metrics=unreachable)


def test_an_unreachable_metrics_endpoint_stops_the_planner_at_startup():
    def refused() -> str:
        raise ConnectionError("connection refused")

    settings = PlanSettings(metrics_url="http://localhost:1/metrics", is_dry_run=True)
    with pytest.raises(PlannerStartupError, match=r"metrics endpoint http://localhost:1/metrics is unreachable \(connection refused\)"):
        build_planner_loop(settings, PlannerConfig(policy="load"), fetch_metrics=refused)


def test_plan_flags_and_their_environment_variables_reach_the_planner_config(monkeypatch):
    from triton_disagg.cli.main import _build_parser
    from triton_disagg.cli.plan import planner_config

    monkeypatch.setenv("TRITON_DISAGG_SCALE_DOWN_WINDOW_S", "90")
    args = _build_parser().parse_args(
        ["plan", "--policy", "slo", "--worker-startup-s", "40", "--quantile", "0.9", "--quantile-window", "10",
         "--prefill-spare-workers", "0"]
    )
    config = planner_config(args)
    assert (config.worker_startup_s, config.scale_down_window_s) == (40.0, 90.0)
    assert (config.predictor.value, config.quantile, config.quantile_window, config.prefill_spare_workers) == (
        "quantile", 0.9, 10, 0)
