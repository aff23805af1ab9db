"""The devices workers may be placed on, and which worker holds which.

An inventory is written as a comma-separated list: `gpu:<index>` names one
GPU, `cpu:<count>` adds that many CPU slots (a CPU slot is a share of the
host a worker may use; CPU slots are interchangeable). Examples: `gpu:0,gpu:1`,
`cpu:4`, `gpu:0,cpu:2`. Each worker holds one slot while it is loaded.
Pure bookkeeping: nothing here talks to a server.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_KINDS = ("gpu", "cpu")


class NoFreeDevice(RuntimeError):
    """Every slot of the inventory is held."""


@dataclass(slots=True, frozen=True)
class DeviceSlot:
    """One GPU (`index` is its CUDA index) or one CPU slot (`index` numbers the slot)."""

    kind: str
    index: int

    @property
    def gpu(self) -> int | None:
        """The GPU index to pin a worker to; None for a CPU slot."""
        return self.index if self.kind == "gpu" else None

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}"


def parse_inventory(text: str) -> list[DeviceSlot]:
    """Slots named by `text` (see the module docstring). ValueError names the bad entry and the fix."""
    slots: list[DeviceSlot] = []
    num_cpu = 0
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        kind, sep, number = entry.partition(":")
        if kind not in DEVICE_KINDS:
            raise ValueError(
                f"device inventory entry {entry!r}: unknown device {kind!r}; write gpu:<index> or cpu:<count>"
            )
        if not sep or not number.isdigit():
            raise ValueError(
                f"device inventory entry {entry!r} needs a number: gpu:<index> (e.g. gpu:0) or cpu:<count> (e.g. cpu:4)"
            )
        if kind == "gpu":
            slot = DeviceSlot("gpu", int(number))
            if slot in slots:
                raise ValueError(f"device inventory lists {slot} twice; name each GPU once")
            slots.append(slot)
        else:
            if int(number) < 1:
                raise ValueError(f"device inventory entry {entry!r}: the CPU slot count must be >= 1")
            slots.extend(DeviceSlot("cpu", num_cpu + i) for i in range(int(number)))
            num_cpu += int(number)
    if not slots:
        raise ValueError("device inventory is empty; list slots such as gpu:0,gpu:1 or cpu:4")
    return slots


class DeviceInventory:
    """Which worker holds which slot. Not thread-safe; the planner's one loop uses it."""

    def __init__(self, slots: list[DeviceSlot]) -> None:
        if len(set(slots)) != len(slots):
            raise ValueError("device inventory slots must be distinct")
        self.slots = list(slots)
        self._holders: dict[DeviceSlot, str] = {}

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_free(self) -> int:
        return len(self.slots) - len(self._holders)

    def slot_of(self, worker: str) -> DeviceSlot | None:
        return next((slot for slot, holder in self._holders.items() if holder == worker), None)

    def take(self, worker: str) -> DeviceSlot:
        """Give a new `worker` the first free slot, in the inventory's order. Raises NoFreeDevice."""
        self._check_holds_none(worker)
        free = next((slot for slot in self.slots if slot not in self._holders), None)
        if free is None:
            raise NoFreeDevice(
                f"no free device for {worker}: all {self.num_slots} slots are held ({self.describe()}); "
                "add slots to the inventory or lower the pools' maximum"
            )
        self._holders[free] = worker
        return free

    def claim(self, worker: str, gpu: int | None) -> DeviceSlot:
        """Record that a worker found running holds GPU `gpu`, or a CPU slot when `gpu` is None.

        ValueError when that GPU is not listed or is held, or no CPU slot is free:
        the inventory does not describe the server.
        """
        self._check_holds_none(worker)
        if gpu is not None:
            slot = DeviceSlot("gpu", gpu)
            if slot not in self.slots:
                raise ValueError(f"{worker} runs on gpu:{gpu}, which the device inventory does not list; add gpu:{gpu}")
            if slot in self._holders:
                raise ValueError(f"{worker} and {self._holders[slot]} both run on gpu:{gpu}")
        else:
            slot = next((s for s in self.slots if s.kind == "cpu" and s not in self._holders), None)
            if slot is None:
                raise ValueError(
                    f"{worker} runs on the CPU but the device inventory has no free CPU slot ({self.describe()}); "
                    "add cpu:<count> to it"
                )
        self._holders[slot] = worker
        return slot

    def _check_holds_none(self, worker: str) -> None:
        if self.slot_of(worker) is not None:
            raise ValueError(f"{worker} already holds {self.slot_of(worker)}")

    def release(self, worker: str) -> DeviceSlot | None:
        """Free the slot `worker` held; None if it held none."""
        slot = self.slot_of(worker)
        if slot is not None:
            del self._holders[slot]
        return slot

    def describe(self) -> str:
        """`gpu:0=decode_0 gpu:1=free`."""
        return " ".join(f"{slot}={self._holders.get(slot, 'free')}" for slot in self.slots)
