"""The planner as a running process: scrape, decide, apply, report, once per interval.

Each tick of `PlannerLoop`:

1. scrapes Triton's metrics page and lists the live workers through the
   connector; if either fails, the tick is refused (logged and counted) and
   nothing changes;
2. turns the change since the last scrape into an `IntervalObservation`
   (`planner.scrape`); the first scrape is only the baseline;
3. runs `Planner.tick` and logs the decision with its reason;
4. applies it through the connector: removals first, then loads. A decision
   whose loads do not fit the free device slots is refused whole, before any
   change. If a load or a drain-and-unload fails, the rest of the decision is
   dropped (logged and counted), and the next tick starts from the pools as
   they are; a pool that did not change gets back the cooldown and grace it
   had (`Planner.applied`);
5. exports desired and actual workers per pool and decisions by reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import prometheus_client as prom

from triton_disagg.planner.connectors import POOLS, PoolConnector
from triton_disagg.planner.core import Planner
from triton_disagg.planner.inventory import DeviceInventory
from triton_disagg.planner.observations import Decision, IntervalObservation
from triton_disagg.planner.scrape import MetricsSnapshot, observe_interval, parse_metrics

logger = logging.getLogger("triton_disagg.planner")


class PlannerMetrics:
    """The planner's own Prometheus series, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.desired = prom.Gauge(
            "triton_disagg_planner_desired_workers", "Workers the last decision wanted", ["pool"], registry=self.registry
        )
        self.actual = prom.Gauge(
            "triton_disagg_planner_actual_workers", "Live workers after the last tick", ["pool"], registry=self.registry
        )
        self.decisions = prom.Counter(
            "triton_disagg_planner_decisions",
            "Decisions per pool, by reason (scale_up, scale_down, steady, hysteresis, cooldown, grace_period, "
            "insufficient_data, budget_clipped)",
            ["pool", "reason"],
            registry=self.registry,
        )
        self.refusals = prom.Counter(
            "triton_disagg_planner_refused_ticks",
            "Ticks that changed nothing because of a fault (metrics_unreachable, server_unreachable, "
            "no_free_device, apply_failed)",
            ["reason"],
            registry=self.registry,
        )
        self._server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve the series on `port` (0: any free port); returns the port."""
        self._server, _ = prom.start_http_server(port, addr=addr, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PlannerLoop:
    """Ticks a `Planner` against a live server. One thread calls `tick` or `run`."""

    def __init__(
        self,
        planner: Planner,
        connector: PoolConnector,
        fetch_metrics: Callable[[], str],
        metrics: PlannerMetrics | None = None,
        inventory: DeviceInventory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.planner = planner
        self.connector = connector
        self.metrics = metrics or PlannerMetrics()
        self.inventory = inventory
        self._fetch_metrics = fetch_metrics
        self._clock = clock
        self._previous: tuple[float, MetricsSnapshot] | None = None
        self._loaded_at_s: dict[str, float] = {}
        #: The last 1000 decisions, each with the observation it came from (newest last).
        self.history: deque[tuple[IntervalObservation, Decision]] = deque(maxlen=1000)

    def tick(self) -> Decision | None:
        """One scrape-decide-apply round; the decision, or None for a baseline or refused tick."""
        now_s = self._clock()
        try:
            snapshot = parse_metrics(self._fetch_metrics())
        except Exception as error:  # noqa: BLE001 - the server may come back; this tick changes nothing
            return self._refuse("metrics_unreachable", f"metrics endpoint unreachable: {error}")
        try:
            workers = {pool: self.connector.workers(pool) for pool in POOLS}
        except Exception as error:  # noqa: BLE001 - as above
            return self._refuse("server_unreachable", f"worker list unavailable: {error}")
        self._set_actual(workers)
        previous, self._previous = self._previous, (now_s, snapshot)
        if previous is None or now_s <= previous[0]:
            return None
        grace_s = self.planner.config.grace_period_s
        in_grace = {
            pool: sum(1 for w in names if now_s - self._loaded_at_s.get(w, -float("inf")) < grace_s)
            for pool, names in workers.items()
        }
        observation = observe_interval(
            previous[1],
            snapshot,
            now_s - previous[0],
            workers["prefill"],
            workers["decode"],
            num_prefill_workers_in_grace=in_grace["prefill"],
            num_decode_workers_in_grace=in_grace["decode"],
        )
        decision = self.planner.tick(observation, now_s)
        self.history.append((observation, decision))
        self._report(observation, decision)
        if decision.is_change:
            self._apply(decision, workers)
        return decision

    def run(self, stop: threading.Event) -> None:
        """Tick every `adjustment_interval_s` until `stop` is set."""
        interval_s = self.planner.config.adjustment_interval_s
        next_at_s = self._clock()
        while not stop.is_set():
            self.tick()
            next_at_s = max(next_at_s + interval_s, self._clock())
            stop.wait(max(0.0, next_at_s - self._clock()))

    def _apply(self, decision: Decision, workers: dict[str, list[str]]) -> None:
        wanted = {"prefill": decision.num_prefill_workers, "decode": decision.num_decode_workers}
        change = {pool: wanted[pool] - len(workers[pool]) for pool in POOLS}
        num_loads = sum(max(0, n) for n in change.values())
        num_unloads = sum(max(0, -n) for n in change.values())
        if self.inventory is not None and num_loads > self.inventory.num_free + num_unloads:
            self._refuse(
                "no_free_device",
                f"{num_loads} worker(s) to load but {self.inventory.num_free} device slot(s) free "
                f"({self.inventory.describe()}); nothing changed",
            )
            self.planner.applied(len(workers["prefill"]), len(workers["decode"]))
            return
        # Removals first: they free the slots that loads may need.
        steps = [(pool, -1) for pool in POOLS for _ in range(max(0, -change[pool]))]
        steps += [(pool, +1) for pool in POOLS for _ in range(max(0, change[pool]))]
        for pool, step in steps:
            try:
                if step > 0:
                    name = self.connector.add_worker(pool)
                    self._loaded_at_s[name] = self._clock()  # grace runs from when it serves
                    logger.info("loaded %s%s", name, self._slot_text(name))
                else:
                    name = self.connector.remove_worker(pool)
                    logger.info("drained and unloaded %s", name)
                    self._loaded_at_s.pop(name or "", None)
            except Exception:  # noqa: BLE001 - logged with its traceback and counted; the next tick re-plans
                logger.exception("%s of a %s worker failed; the rest of this decision is dropped", "load" if step > 0 else "unload", pool)
                self.metrics.refusals.labels(reason="apply_failed").inc()
                break
        try:
            after = {pool: self.connector.workers(pool) for pool in POOLS}
        except Exception as error:  # noqa: BLE001 - the next tick refreshes it
            logger.warning("could not list workers after applying: %s", error)
            return
        self._set_actual(after)
        # Cooldown and grace start only for a pool that really changed.
        self.planner.applied(len(after["prefill"]), len(after["decode"]))

    def _slot_text(self, name: str) -> str:
        slot = self.inventory.slot_of(name) if self.inventory is not None else None
        return "" if slot is None else f" on {slot}"

    def _report(self, observation: IntervalObservation, decision: Decision) -> None:
        for pool, num, reason in (
            ("prefill", decision.num_prefill_workers, decision.prefill_reason),
            ("decode", decision.num_decode_workers, decision.decode_reason),
        ):
            self.metrics.desired.labels(pool=pool).set(num)
            self.metrics.decisions.labels(pool=pool, reason=reason).inc()
        logger.info(
            "decision %s: prefill %d -> %d, decode %d -> %d (%d requests, %.3g req/s, decode KV usage %s); %s",
            decision.reason,
            observation.num_prefill_workers,
            decision.num_prefill_workers,
            observation.num_decode_workers,
            decision.num_decode_workers,
            observation.num_requests,
            observation.request_rate_per_s,
            "n/a" if observation.decode_kv_usage is None else f"{observation.decode_kv_usage:.2f}",
            decision.detail,
        )

    def _set_actual(self, workers: dict[str, list[str]]) -> None:
        for pool, names in workers.items():
            self.metrics.actual.labels(pool=pool).set(len(names))

    def _refuse(self, reason: str, message: str) -> None:
        logger.warning("tick refused (%s): %s", reason, message)
        self.metrics.refusals.labels(reason=reason).inc()
        return None
