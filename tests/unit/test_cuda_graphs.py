"""Decode steps replayed from CUDA graphs give the tokens eager steps give.

The capture and replay tests need a GPU: they run with TRITON_DISAGG_TEST_DEVICE=cuda
and are skipped otherwise. The batch-size arithmetic runs everywhere.
"""

from __future__ import annotations

import os

import pytest
import torch

from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.cuda_graphs import capture_sizes, padded_size
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import SamplingParams

DEVICE = os.environ.get("TRITON_DISAGG_TEST_DEVICE", "cpu")
needs_cuda = pytest.mark.skipif(
    not (DEVICE.startswith("cuda") and torch.cuda.is_available()), reason="CUDA graphs need TRITON_DISAGG_TEST_DEVICE=cuda"
)


@pytest.mark.parametrize(
    "max_num_seqs, sizes",
    [(1, [1]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 24, 32, 40]), (30, [1, 2, 4, 8, 16, 24, 30])],
)
def test_capture_sizes(max_num_seqs, sizes):
    assert capture_sizes(max_num_seqs) == sizes


def test_padded_size_is_the_smallest_captured_size_that_fits():
    sizes = [1, 2, 4, 8, 16]
    assert [padded_size(sizes, n) for n in (1, 3, 4, 9, 16, 17)] == [1, 4, 4, 16, 16, None]


def test_no_graphs_on_cpu(tiny_model):
    engine = LLMEngine(EngineConfig(model_path=str(tiny_model), device="cpu", num_blocks=32))
    assert engine.runner.graphs is None
    assert engine.runner.kv_pool.shape[0] == 32


@needs_cuda
@pytest.mark.parametrize("num_prompts", [1, 3, 9])  # 3 and 9 replay padded graphs (4 and 16)
def test_replayed_decode_gives_eager_tokens(tiny_model, num_prompts):
    generator = torch.Generator().manual_seed(num_prompts)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in range(20, 20 + 37 * num_prompts, 37)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)

    def run(enforce_eager: bool) -> tuple[list[list[int]], LLMEngine]:
        engine = LLMEngine(
            EngineConfig(
                model_path=str(tiny_model), device=DEVICE, dtype="float32", num_blocks=256, max_num_seqs=16,
                max_model_len=512, enforce_eager=enforce_eager,
            )  # fmt: skip
        )
        return engine.generate(prompts, params), engine

    replayed, engine = run(False)
    assert engine.runner.graphs is not None and engine.runner.graphs.sizes == [1, 2, 4, 8, 16]
    assert engine.runner.kv_pool.shape[0] == 256  # the scratch block is not part of the pool
    eager, eager_engine = run(True)
    assert eager_engine.runner.graphs is None
    assert replayed == eager
