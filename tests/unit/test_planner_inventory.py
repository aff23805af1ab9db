"""Device inventory: parsing, which worker holds which slot, and the dry-run connector placing on it."""

from __future__ import annotations

import pytest

from triton_disagg.planner.connectors import DryRunConnector
from triton_disagg.planner.inventory import DeviceInventory, DeviceSlot, NoFreeDevice, parse_inventory


def make_inventory(text: str = "gpu:0,gpu:1") -> DeviceInventory:
    return DeviceInventory(parse_inventory(text))


@pytest.mark.parametrize(
    ("text", "slots"),
    [
        ("gpu:0,gpu:1", ["gpu:0", "gpu:1"]),
        ("gpu:3, gpu:1", ["gpu:3", "gpu:1"]),
        ("cpu:4", ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]),
        ("gpu:0,cpu:2,cpu:1", ["gpu:0", "cpu:0", "cpu:1", "cpu:2"]),
    ],
)
def test_parse_lists_slots_in_order(text, slots):
    assert [str(slot) for slot in parse_inventory(text)] == slots


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tpu:0", "device inventory entry 'tpu:0': unknown device 'tpu'; write gpu:<index> or cpu:<count>"),
        ("gpu", "device inventory entry 'gpu' needs a number"),
        ("gpu:x", "device inventory entry 'gpu:x' needs a number"),
        ("gpu:0,gpu:0", "device inventory lists gpu:0 twice"),
        ("cpu:0", "the CPU slot count must be >= 1"),
        (" , ", "device inventory is empty"),
    ],
)
def test_bad_inventories_are_named(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_inventory(text)


def test_workers_take_the_first_free_slot_and_free_it_when_removed():
    inventory = make_inventory()
    assert inventory.take("decode_0") == DeviceSlot("gpu", 0)
    assert inventory.take("decode_1") == DeviceSlot("gpu", 1)
    assert inventory.num_free == 0
    with pytest.raises(NoFreeDevice, match=r"no free device for prefill_0: all 2 slots are held \(gpu:0=decode_0 gpu:1=decode_1\)"):
        inventory.take("prefill_0")
    assert inventory.release("decode_0") == DeviceSlot("gpu", 0)
    assert inventory.release("decode_0") is None
    assert inventory.take("prefill_0") == DeviceSlot("gpu", 0)
    assert inventory.describe() == "gpu:0=prefill_0 gpu:1=decode_1"
    assert inventory.slot_of("decode_1").gpu == 1


def test_running_workers_claim_the_gpu_their_config_names():
    inventory = make_inventory()
    assert inventory.claim("decode_0", 1) == DeviceSlot("gpu", 1)
    assert inventory.take("decode_1") == DeviceSlot("gpu", 0)
    with pytest.raises(ValueError, match="decode_2 runs on gpu:5, which the device inventory does not list; add gpu:5"):
        inventory.claim("decode_2", 5)
    with pytest.raises(ValueError, match="decode_2 and decode_0 both run on gpu:1"):
        inventory.claim("decode_2", 1)
    with pytest.raises(ValueError, match="decode_2 runs on the CPU but the device inventory has no free CPU slot"):
        inventory.claim("decode_2", None)
    with pytest.raises(ValueError, match="decode_0 already holds gpu:1"):
        inventory.take("decode_0")


def test_cpu_slots_are_interchangeable():
    inventory = make_inventory("cpu:2")
    assert inventory.claim("decode_0", None) == DeviceSlot("cpu", 0)
    assert inventory.take("decode_1").gpu is None
    assert inventory.num_free == 0


def test_dry_run_connector_places_its_workers():
    inventory = make_inventory("cpu:3")
    connector = DryRunConnector(sizes={"prefill": 1, "decode": 1}, inventory=inventory)
    assert inventory.describe() == "cpu:0=prefill_0 cpu:1=decode_0 cpu:2=free"
    assert connector.add_worker("decode") == "decode_1"
    with pytest.raises(NoFreeDevice):
        connector.add_worker("decode")
    assert connector.workers("decode") == ["decode_0", "decode_1"]  # the refused load changed nothing
    assert connector.remove_worker("decode") == "decode_1"
    assert inventory.describe() == "cpu:0=prefill_0 cpu:1=decode_0 cpu:2=free"
