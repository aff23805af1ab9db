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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import requests

from planner.inventory import DeviceInventory

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
    Raises on a failed load or a drain that does not finish in `drain_timeout_s`
    (the worker then stays loaded and drained; nothing is half applied).
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
    ):
        from tools.model_control import ModelControl

        self._http_url = http_url
        self._metrics_url = metrics_url
        self._repository = Path(repository)
        self._headers = headers or {}
        self._control = ModelControl(http_url, headers)
        self._drain_timeout_s = drain_timeout_s
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
            return name
        from tools.model_control import Placement

        slot = self.inventory.take(name)
        try:
            self._control.load_worker(self._repository, pool, name, Placement(gpu=slot.gpu))
        except BaseException:
            self.inventory.release(name)
            raise
        return name

    def remove_worker(self, pool: str) -> str | None:
        workers = self.workers(pool)
        if not workers:
            return None
        name = workers[-1]
        self._drain(name)
        self._control.unload(name)
        if self.inventory is not None:
            self.inventory.release(name)
        return name

    def _drain(self, name: str) -> None:
        body = {
            "inputs": [
                {"name": "action", "shape": [1], "datatype": "BYTES", "data": ["drain"]},
                {"name": "worker_name", "shape": [1], "datatype": "BYTES", "data": [name]},
            ]
        }
        response = requests.post(f"{self._http_url}/v2/models/router/infer", json=body, headers=self._headers, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"router refused to drain {name}: {response.text}")
        time.sleep(0.5)  # requests routed just before the drain reach the worker
        deadline = time.monotonic() + self._drain_timeout_s
        while self._busy(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still had requests after {self._drain_timeout_s:.0f} s of draining")
            time.sleep(0.2)

    def _busy(self, name: str) -> bool:
        """Requests running or queued on `name`, or KV it still holds for a decode worker."""
        page = requests.get(self._metrics_url, timeout=10).text
        total = 0.0
        for metric in ("running_requests", "waiting_requests", "kv_held_blocks"):
            found = re.findall(rf'^triton_disagg_{metric}\{{[^}}]*model="{re.escape(name)}"[^}}]*\}} (\S+)$', page, re.MULTILINE)
            total += sum(float(v) for v in found)
        return total > 0
