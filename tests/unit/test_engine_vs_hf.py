"""The engine against Hugging Face transformers on tiny random checkpoints: same logits, same greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triton_disagg.engine.config import EngineConfig  # noqa: E402
from triton_disagg.engine.llm_engine import LLMEngine  # noqa: E402
from triton_disagg.engine.params import SamplingParams  # noqa: E402

NUM_NEW_TOKENS = 32
#: The engine runs here; the reference always runs on the CPU. Set to "cuda" to check the GPU path.
DEVICE = os.environ.get("TRITON_DISAGG_TEST_DEVICE", "cpu")
COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
ARCHITECTURES = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON)),
    "mixtral": lambda: transformers.MixtralForCausalLM(
        transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    ),
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory):
    """A randomly initialised HF model saved by transformers itself, and that model in eval mode."""
    torch.manual_seed(0)
    model = ARCHITECTURES[request.param]()
    with torch.no_grad():  # wider weights than HF's init, so logits are far from ties
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1)
    model.eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def make_engine(path, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=str(path), device=DEVICE, dtype="float32", num_blocks=128, **overrides))


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(num_tokens):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


def prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 300, (n,), generator=generator).tolist() for n in lengths]


GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def test_prefill_logits_match(checkpoint):
    path, model = checkpoint
    engine = make_engine(path)
    prompt = prompts([23])[0]
    engine.add_request("r", prompt, GREEDY)
    logits = engine.runner.execute(engine.scheduler.schedule())
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(logits[0].cpu(), expected, rtol=1e-4, atol=1e-4)


def test_single_prompt_greedy_matches(checkpoint):
    path, model = checkpoint
    prompt = prompts([17])[0]
    assert make_engine(path).generate([prompt], GREEDY)[0] == hf_greedy(model, prompt, NUM_NEW_TOKENS)


@pytest.mark.parametrize("max_num_batched_tokens", [512, 16], ids=["whole-prompts", "chunked-prefill"])
def test_batch_of_different_lengths_matches(checkpoint, max_num_batched_tokens):
    path, model = checkpoint
    batch = prompts([5, 33, 16, 61])
    outputs = make_engine(path, max_num_batched_tokens=max_num_batched_tokens).generate(batch, GREEDY)
    assert outputs == [hf_greedy(model, prompt, NUM_NEW_TOKENS) for prompt in batch]


def test_prefix_cache_hit_gives_cold_run_tokens(checkpoint):
    path, _ = checkpoint
    shared = prompts([48])[0]
    first, second = shared + [1, 2, 3], shared + [7, 8]
    cold = make_engine(path, enable_prefix_caching=False).generate([second], GREEDY)[0]
    engine = make_engine(path)
    engine.generate([first], GREEDY)
    engine.add_request("hit", second, GREEDY)
    tokens, cached = [], 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens += output.new_token_ids
            cached = output.num_cached_tokens
    assert cached == 48  # three full 16-token blocks of the shared prefix
    assert tokens == cold


def test_expert_parallel_greedy_matches(checkpoint):
    """Two rank processes; the child rank reads its experts from the checkpoint transformers wrote."""
    path, model = checkpoint
    if not model.config.model_type == "mixtral":
        pytest.skip("a dense model has no experts to split")
    engine = make_engine(path, ep_size=2, eplb_redundant_experts=2)
    try:
        batch = prompts([9, 30])
        assert engine.generate(batch, GREEDY) == [hf_greedy(model, prompt, NUM_NEW_TOKENS) for prompt in batch]
    finally:
        engine.shutdown()
