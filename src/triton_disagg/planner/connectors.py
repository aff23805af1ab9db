"""Connectors: how a planner decision becomes workers loaded or unloaded.

`TritonConnector` grows a pool by loading a copy of the pool's template
under the next free name (`decode_<j>`), and shrinks it by draining first:
the router stops sending the worker new requests, the requests it holds
finish, then it is unloaded. With a device inventory, each worker it loads
takes a free slot and is pinned there (`instance_group`), and a worker it
unloads frees its slot. `DryRunConnector` only records what it would do.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from triton_disagg.planner.inventory import DeviceInventory

POOLS = ("prefill", "decode")


class PoolConnector(Protocol):
    def workers(self, pool: str) -> list[str]:
        """Live workers of `pool` ("prefill" or "decode"), sorted by name."""

    def add_worker(self, pool: str) -> str:
        """Load one more worker into `pool`; returns its name once it serves."""

    def remove_worker(self, pool: str) -> str | None:
        """Drain and unload the newest worker of `pool`; returns its name (None when the pool is empty)."""


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


@dataclass(slots=True)
class DryRunConnector:
    """Keeps pool sizes in memory and a log of every change it was asked for.

    With an `inventory`, its workers take and free slots as real ones would.
    """

    sizes: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 1})
    log: list[tuple[str, str]] = field(default_factory=list)  # (action, worker name)
    inventory: DeviceInventory | None = None

    def __post_init__(self) -> None:
        if self.inventory is not None:
            for pool in POOLS:
                for name in self.workers(pool):
                    self.inventory.take(name)

    def workers(self, pool: str) -> list[str]:
        _check_pool(pool)
        return [f"{pool}_{i}" for i in range(self.sizes[pool])]

    def add_worker(self, pool: str) -> str:
        _check_pool(pool)
        name = f"{pool}_{self.sizes[pool]}"
        if self.inventory is not None:
            self.inventory.take(name)
        self.sizes[pool] += 1
        self.log.append(("load", name))
        return name

    def remove_worker(self, pool: str) -> str | None:
        _check_pool(pool)
        if not self.sizes[pool]:
            return None
        self.sizes[pool] -= 1
        name = f"{pool}_{self.sizes[pool]}"
        if self.inventory is not None:
            self.inventory.release(name)
        self.log.append(("unload", name))
        return name


class TritonConnector:
    """One Triton server: its HTTP endpoint, metrics page, and model repository on this node.

    `headers` go with every model-control call (e.g. a restricted-API key).
    A worker is removed in four steps: the router stops routing to it
    (`drain`); the connector waits until the router counts no request routed
    to it and its own gauges show nothing running, waiting or held; it is
    unloaded; and the connector waits until Triton lists it UNAVAILABLE or
    not at all (`unload_timeout_s`) before its inventory slot is freed. When
    the wait runs past `drain_timeout_s`, or the unload fails while the worker
    is still READY, the router routes to it again (`undrain`) and the error is
    raised: the worker serves as before. A worker stuck UNLOADING keeps its slot.
    With an `inventory`, the workers already loaded claim their slots when the
    connector is made (ValueError if the inventory does not hold them), and
    `add_worker` raises NoFreeDevice before loading anything when no slot is free.
    """

    def __init__(
        self,
        http_url: str,
        metrics_url: str,
        repository: Path,
        headers: dict[str, str] | None = None,
        drain_timeout_s: float = 120.0,
        inventory: DeviceInventory | None = None,
        unload_timeout_s: float = 60.0,
        poll_s: float = 0.2,
    ):
        from triton_disagg.model_control import ModelControl

        self._http_url = http_url
        self._metrics_url = metrics_url
        self._repository = Path(repository)
        self._headers = headers or {}
        self._control = ModelControl(http_url, headers)
        self._drain_timeout_s = drain_timeout_s
        self._unload_timeout_s = unload_timeout_s
        self._poll_s = poll_s
        self.inventory = inventory
        if inventory is not None:
            for pool in POOLS:
                for name in self.workers(pool):
                    inventory.claim(name, self._control.placement_of(name).gpu)

    def workers(self, pool: str) -> list[str]:
        _check_pool(pool)
        pattern = re.compile(rf"^{pool}_(\d+)$")
        return sorted((n for n in self._control.ready_models() if pattern.match(n)), key=lambda n: int(n.rsplit("_", 1)[1]))

    def add_worker(self, pool: str) -> str:
        _check_pool(pool)
        taken = {int(n.rsplit("_", 1)[1]) for n in self.workers(pool)}
        name = f"{pool}_{next(i for i in range(len(taken) + 1) if i not in taken)}"
        if self.inventory is None:
            self._control.load_worker(self._repository, pool, name)
        else:
            from triton_disagg.model_control import Placement

            slot = self.inventory.take(name)
            try:
                self._control.load_worker(self._repository, pool, name, Placement(gpu=slot.gpu))
            except BaseException:
                self.inventory.release(name)
                raise
        # A worker of the same name unloaded before the router's next poll would still be drained there.
        self._call_router("undrain", name)
        return name

    def remove_worker(self, pool: str) -> str | None:
        workers = self.workers(pool)
        if not workers:
            return None
        name = workers[-1]
        self._call_router("drain", name)
        try:
            self._wait_until_idle(name)
            self._control.unload(name, self._unload_timeout_s, self._poll_s)
        except BaseException:
            if self._control.state_of(name) == "READY":
                self._call_router("undrain", name)
            raise
        if self.inventory is not None:
            self.inventory.release(name)
        return name

    def _wait_until_idle(self, name: str) -> None:
        """wait_until_idle with this server's router and metrics page."""
        wait_until_idle(name, lambda: self._call_router("inflight", name), lambda: self._busy(name), self._drain_timeout_s, self._poll_s)

    def _call_router(self, action: str, name: str) -> int:
        """triton_disagg.model_control.router_action on this server; raises RuntimeError when the router refuses."""
        from triton_disagg.model_control import router_action

        return router_action(self._http_url, action, name, self._headers)

    def _busy(self, name: str) -> bool:
        """Whether the metrics page says `name` may still be working (see `is_worker_idle`); raises on an error page."""
        response = requests.get(self._metrics_url, timeout=10)
        response.raise_for_status()
        return not is_worker_idle(response.text, name)


def wait_until_idle(
    name: str, count_inflight: Callable[[], int], is_busy: Callable[[], bool], timeout_s: float, poll_s: float
) -> None:
    """Wait until the router counts no request on worker `name` and the worker reports none.

    The router's count (`count_inflight`) covers a request from its route
    decision on, so one still queued in Triton or being handed to the engine
    counts; the worker's gauges (`is_busy`) add KV a prefill worker still holds
    for a decode worker. Raises TimeoutError after `timeout_s`, and whatever
    the two calls raise (RuntimeError when the router refuses).
    """
    deadline_s = time.monotonic() + timeout_s
    while (num_inflight := count_inflight()) or is_busy():
        if time.monotonic() > deadline_s:
            why = f"the router counts {num_inflight} requests on it" if num_inflight else "its gauges are not all 0"
            raise TimeoutError(f"{name} was not idle after {timeout_s:g} s of draining: {why}")
        time.sleep(poll_s)


#: Worker gauges that must all be present and 0 before a worker is unloaded.
IDLE_GAUGES = ("triton_disagg_running_requests", "triton_disagg_waiting_requests", "triton_disagg_kv_held_blocks")


def is_worker_idle(metrics_text: str, name: str) -> bool:
    """Whether worker `name` reports nothing running, queued or held: each of IDLE_GAUGES present and 0.

    A missing series is unknown, not idle (a page without the worker's gauges).
    """
    for gauge in IDLE_GAUGES:
        values = re.findall(rf'^{gauge}\{{[^}}]*model="{re.escape(name)}"[^}}]*\}} (\S+)$', metrics_text, re.MULTILINE)
        if not values or any(float(value) != 0 for value in values):
            return False
    return True
