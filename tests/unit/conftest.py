from __future__ import annotations

import pytest

from triton_disagg.checkpoint import make_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The project's default dense checkpoint, written once per test session."""
    return make_model(tmp_path_factory.mktemp("tiny-dense"), "dense")


@pytest.fixture(scope="session")
def tiny_moe_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("tiny-moe"), "moe")
