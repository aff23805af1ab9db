"""MoE serving on a real Triton server: expert parallelism over two rank processes, live rebalancing,
expert-load metrics on the metrics port, and the expert-load dump."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch

from triton_disagg.checkpoint import make_model
from triton_disagg.cli.main import main as cli_main
from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams
from triton_disagg.model_control import ModelControl

from tests.e2e.conftest import Client, _start

pytestmark = pytest.mark.e2e

MAX_TOKENS = 20
#: Narrow prompts (a few repeated bytes) drive a few experts hot.
PROMPTS = [list(range(97, 101)) * n + [32] * n for n in (3, 5, 8, 11)] + [[120, 121] * 9, [65] * 30]


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models") / "tiny-moe", "moe")


@pytest.fixture(scope="module")
def moe(tmp_path_factory, moe_model) -> Iterator[Client]:
    """One aggregated decode worker whose engine is rank 0 of two; experts rebalanced every 4 steps."""
    with _start(
        tmp_path_factory, moe_model, prefill_workers=0, decode_workers=1,
        ep_size=2, eplb_redundant_experts=2, eplb_interval=4, eplb_window=32, eplb_threshold=1.0,
    ) as running:
        yield Client(running)


def series(client: Client, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of metric `name`, by its sorted labels."""
    text = requests.get(client.server.metrics_url, headers={"Connection": "close"}, timeout=10).text
    return {
        tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels))): float(value)
        for labels, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
    }


def decode(client: Client, prompt: list[int]) -> list[int]:
    inputs = {
        "input_ids": np.array(prompt, dtype=np.int32),
        "max_tokens": np.array([MAX_TOKENS], dtype=np.int32),
        "ignore_eos": np.array([True]),
    }
    return [int(t) for r in client.grpc_stream(inputs, model="decode_0") for t in r.as_numpy("output_ids")]


def test_expert_parallel_serving_rebalances_live_without_changing_a_token(moe, moe_model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = LLMEngine(EngineConfig(model_path=str(moe_model), device="cpu", num_blocks=64))
        expected = reference.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    finally:
        torch.set_num_threads(threads)
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:  # batched together, rebalanced while running
        outputs = list(pool.map(lambda p: decode(moe, p), PROMPTS * 2))
    assert outputs == expected * 2
    deadline_s = time.monotonic() + 30
    while not series(moe, "triton_disagg_eplb_rearrangements_total") and time.monotonic() < deadline_s:
        time.sleep(0.2)
    assert series(moe, "triton_disagg_eplb_rearrangements_total")[(("model", "decode_0"),)] >= 1
    assert series(moe, "triton_disagg_eplb_moved_slots_total")[(("model", "decode_0"),)] >= 1


def test_expert_load_metrics_and_dump_agree(moe, tmp_path):
    decode(moe, PROMPTS[0])
    dump_path = tmp_path / "expert_load.json"
    deadline_s = time.monotonic() + 30
    while True:  # the worker publishes when it goes idle; wait until metrics and dump show the same totals
        assert cli_main(["expert-load", "--url", moe.server.http_url, "--output", str(dump_path), "--plan-ep-size", "2"]) == 0
        dump = json.loads(dump_path.read_text())["workers"]["decode_0"]
        tokens = series(moe, "triton_disagg_moe_expert_tokens_total")
        by_layer_expert = {(dict(k)["layer"], dict(k)["expert"]): v for k, v in tokens.items() if dict(k)["model"] == "decode_0"}
        total = {(str(layer), str(e)): n for layer, row in enumerate(dump["total_load"]) for e, n in enumerate(row)}
        if by_layer_expert == total or time.monotonic() > deadline_s:
            break
        time.sleep(0.2)
    assert by_layer_expert == total
    # Every layer saw the same tokens, each routed to top-2 experts.
    per_layer = [sum(row) for row in dump["total_load"]]
    assert len(set(per_layer)) == 1 and per_layer[0] > 0 and per_layer[0] % 2 == 0
    assert dump["ep_size"] == 2 and dump["num_slots"] == 6 and len(dump["physical_to_logical"]) == 4
    balancedness = series(moe, "triton_disagg_eplb_balancedness")
    stats = {dict(k)["stat"]: v for k, v in balancedness.items() if dict(k)["model"] == "decode_0"}
    assert stats["min"] == pytest.approx(min(dump["balancedness"]))
    assert stats["mean"] == pytest.approx(sum(dump["balancedness"]) / 4)
    assert 0 < dump["plan"]["mean_balancedness"] <= 1


def test_a_dense_worker_has_no_expert_load(client):
    response = requests.post(f"{client.server.http_url}/v2/models/decode_0/generate", json={"dump_expert_load": True}, timeout=30)
    assert response.status_code == 400
    assert "dense model" in response.text


def test_unloading_the_worker_stops_its_ranks(moe):
    """Last in this module: it unloads the worker."""
    ranks = expert_ranks_of(moe.server.run_dir / "model_repository" / "decode_0")
    assert len(ranks) == 1  # ep_size 2: the worker's engine and one child rank
    control = ModelControl(moe.server.http_url)
    try:
        control.unload("decode_0")
    finally:
        control.close()
    deadline_s = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline_s:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks)


def expert_ranks_of(worker_dir: Path) -> list[int]:
    """Pids of the expert-parallel ranks whose parent is the Python backend stub serving `worker_dir`."""
    def cmdline(pid: str) -> str:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""

    ranks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "triton_disagg.engine.expert_rank" in cmdline(entry.name):
            try:
                parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except OSError:
                continue
            if str(worker_dir) in cmdline(parent):
                ranks.append(int(entry.name))
    return ranks
