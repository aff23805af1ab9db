from __future__ import annotations

import threading

import pytest
import torch

from triton_disagg.checkpoint import make_model
from triton_disagg.engine.tiers.copier import TorchMover


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The project's default dense checkpoint, written once per test session."""
    return make_model(tmp_path_factory.mktemp("tiny-dense"), "dense")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-moe"), "moe")


class GatedMover(TorchMover):
    """A KV tier mover that holds each block copy and file read until `gate` is set, and each file
    write until `disk_gate` is set (both start set)."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.gate = threading.Event()
        self.gate.set()
        self.disk_gate = threading.Event()
        self.disk_gate.set()

    def write_file(self, op, layout) -> None:
        assert self.disk_gate.wait(10), "the disk gate stayed closed"
        super().write_file(op, layout)

    def copy_blocks(self, op, ready_event) -> None:
        assert self.gate.wait(10), "the gate stayed closed"
        super().copy_blocks(op, ready_event)

    def read_file(self, op, layout) -> None:
        assert self.gate.wait(10), "the gate stayed closed"
        super().read_file(op, layout)


@pytest.fixture
def gated_mover() -> GatedMover:
    """A mover whose copies a test can hold in flight (`gated_mover.gate.clear()`)."""
    return GatedMover()
