"""Engine behaviour on the default checkpoint: scheduling, preemption, sampling, limits, aborts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from triton_disagg.engine.config import EngineConfig
from triton_disagg.engine.llm_engine import LLMEngine
from triton_disagg.engine.params import FinishReason, InvalidRequest, SamplingParams


def make_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**({"model_path": str(path), "device": "cpu", "num_blocks": 64} | overrides)))


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


def run_all(engine: LLMEngine) -> dict[str, tuple[list[int], FinishReason]]:
    results: dict[str, tuple[list[int], FinishReason | None]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens, _ = results.get(out.request_id, ([], None))
            results[out.request_id] = (tokens + out.new_token_ids, out.finish_reason)
    return results


def test_preemption_under_block_pressure_keeps_outputs_and_frees_blocks(tiny_model):
    batch = prompts([30, 45, 20, 60, 33, 50])
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    expected = make_engine(tiny_model, num_blocks=256).generate(batch, params)
    tight = make_engine(tiny_model, num_blocks=16)  # 256 tokens of KV for ~500 needed at once
    preempted = 0
    for i, prompt in enumerate(batch):
        tight.add_request(f"r{i}", prompt, params)
    results: dict[str, list[int]] = {f"r{i}": [] for i in range(len(batch))}
    while tight.has_unfinished_requests():
        batch_view = tight.scheduler.running[:]
        for out in tight.step():
            results[out.request_id] += out.new_token_ids
        preempted += sum(seq not in tight.scheduler.running and not seq.is_finished for seq in batch_view)
    assert preempted > 0
    assert [results[f"r{i}"] for i in range(len(batch))] == expected
    assert tight.block_manager.num_free_blocks == 16
    tight.block_manager.check_integrity()


def test_step_token_counts_with_chunking(tiny_model):
    engine = make_engine(tiny_model, max_num_batched_tokens=32)
    engine.add_request("long", prompts([100])[0], SamplingParams(max_tokens=3, ignore_eos=True))
    engine.add_request("short", prompts([5], seed=1)[0], SamplingParams(max_tokens=3, ignore_eos=True))
    per_step = []
    while engine.has_unfinished_requests():
        per_step.append([(seq.request_id, seq.num_computed_tokens) for seq in engine.scheduler.running])
        engine.step()
    # long: 32, 64, 96 (+short's 5 joins in the 4th step: 4 long tokens + 5 short), then decodes.
    assert per_step[1:5] == [
        [("long", 32)],
        [("long", 64)],
        [("long", 96)],
        [("long", 100), ("short", 5)],
    ]


@pytest.mark.parametrize(
    "prompt_len, overrides, message",
    [
        (0, {}, "prompt is empty"),
        (4096, {}, "context window is 4096"),
        (100, {"max_tokens": 4000}, "Reduce max_tokens to at most 3996"),
        (10, {"max_tokens": 0}, "max_tokens must be"),
        (10, {"temperature": -0.5}, "temperature must be >= 0"),
        (10, {"top_p": 0.0}, "top_p must be in (0, 1]"),
        (10, {"top_p": 1.5}, "top_p must be in (0, 1]"),
        (10, {"top_k": -1}, "top_k must be"),
    ],
)
def test_invalid_requests_are_rejected_with_a_clear_message(tiny_model, prompt_len, overrides, message):
    engine = make_engine(tiny_model)
    with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        engine.add_request("r", [1] * prompt_len, SamplingParams(**({"max_tokens": 4} | overrides)))
    assert not engine.has_unfinished_requests()


def test_out_of_vocabulary_tokens_and_pool_overflow_are_rejected(tiny_model):
    engine = make_engine(tiny_model, num_blocks=4)
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request("r", [1, 100000], SamplingParams())
    with pytest.raises(InvalidRequest, match="needs 5 KV blocks but this worker's pool has 4"):
        engine.add_request("r", [1] * 60, SamplingParams(max_tokens=20))


def test_abort_frees_blocks_and_reports_abort(tiny_model):
    engine = make_engine(tiny_model)
    engine.add_request("a", prompts([40])[0], SamplingParams(max_tokens=100, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_free_blocks < 64
    assert engine.abort_request("a")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("a", FinishReason.ABORT)]
    assert engine.block_manager.num_free_blocks == 64
    assert not engine.abort_request("a")


def test_seeded_sampling_is_independent_of_the_batch(tiny_model):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = make_engine(tiny_model).generate(prompts([12]), params)[0]
    others = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = make_engine(tiny_model).generate(prompts([12]) + prompts([30, 7], seed=3), [params, others, others])
    assert batch[0] == alone
    unseeded = make_engine(tiny_model, seed=1).generate(prompts([12]), SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True))
    assert unseeded[0] != alone


@pytest.mark.parametrize("overrides", [{"top_k": 1}, {"top_p": 1e-6}], ids=["top_k=1", "top_p~0"])
def test_degenerate_filters_equal_greedy(tiny_model, overrides):
    greedy = make_engine(tiny_model).generate(prompts([20]), SamplingParams(max_tokens=16, ignore_eos=True))
    sampled = make_engine(tiny_model).generate(
        prompts([20]), SamplingParams(max_tokens=16, temperature=2.0, ignore_eos=True, **overrides)
    )
    assert sampled == greedy


def test_stop_token_ids_and_eos(tiny_model):
    engine = make_engine(tiny_model)
    full = engine.generate(prompts([20]), SamplingParams(max_tokens=16, ignore_eos=True))[0]
    stop_at = full[5]
    first = full.index(stop_at)
    engine.add_request("r", prompts([20])[0], SamplingParams(max_tokens=16, stop_token_ids=(stop_at,)))
    tokens, reason = run_all(engine)["r"]
    assert tokens == full[: first + 1] and reason == FinishReason.STOP


def test_moe_engine_counts_expert_tokens(tiny_moe_model):
    engine = make_engine(tiny_moe_model)
    engine.generate(prompts([10]), SamplingParams(max_tokens=5, ignore_eos=True))
    counts = engine.model.expert_token_counts()
    # 4 layers; every token goes to top-2 of 4 experts: (10 prompt + 4 decoded inputs) * 2 per layer.
    assert counts.shape == (4, 4)
    assert counts.sum(dim=1).tolist() == [28, 28, 28, 28]


def test_block_hashes_are_stable_across_processes():
    code = "from triton_disagg.router.hashing import hash_request_tokens; print(hash_request_tokens(list(range(64)), 16, ('lora',)))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    from triton_disagg.router.hashing import hash_request_tokens

    assert runs == {f"{hash_request_tokens(list(range(64)), 16, ('lora',))}\n"}
