"""IncrementalDetokenizer on the default model's byte-level tokenizer."""

import pytest

from triton_disagg.checkpoint import byte_level_tokenizer
from triton_disagg.serving.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def stream(tokenizer, prompt: str, output: str, tokens_per_push: int = 1) -> list[str]:
    """Feed `output`'s tokens in groups; return every delta, the flush last."""
    prompt_ids = tokenizer.encode(prompt).ids
    output_ids = tokenizer.encode(output, add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.push(output_ids[i : i + tokens_per_push]) for i in range(0, len(output_ids), tokens_per_push)]
    return deltas + [detokenizer.flush()]


@pytest.mark.parametrize("tokens_per_push", [1, 2, 5])
@pytest.mark.parametrize("output", ["hello world", "héllo ✓ 日本", "🙂🙂 x", "  leading spaces"])
def test_deltas_join_to_the_text(tokenizer, output, tokens_per_push):
    assert "".join(stream(tokenizer, "prompt: ", output, tokens_per_push)) == output


def test_multi_byte_character_is_held_back_until_complete(tokenizer):
    # "日" is three bytes, so three tokens: the first two decode to U+FFFD and are held.
    assert stream(tokenizer, "x", "a日b") == ["a", "", "", "日", "b", ""]


def test_no_delta_contains_a_replacement_character(tokenizer):
    for delta in stream(tokenizer, "x", "héllo ✓ 日本 🙂")[:-1]:
        assert "\ufffd" not in delta


def test_flush_returns_an_incomplete_character_as_replacement(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("x").ids)
    first_two_bytes_of_ri = list("日".encode())[:2]  # token id == byte value in this tokenizer
    assert detokenizer.push([ord("a")]) == "a"
    assert detokenizer.push(first_two_bytes_of_ri) == ""
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.num_output_tokens == 3


def test_invalid_byte_is_emitted_once_followed_by_text(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("x").ids)
    assert detokenizer.push([0xFF]) == ""  # a lone 0xFF decodes to U+FFFD: held, it might still complete
    assert detokenizer.push([ord("a")]) == "\ufffda"
    assert detokenizer.flush() == ""


def test_special_tokens_are_skipped(tokenizer):
    eos_id = tokenizer.token_to_id("</s>")
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("x").ids)
    assert detokenizer.push([ord("o"), ord("k")]) == "ok"
    assert detokenizer.push([eos_id]) == ""
    assert detokenizer.flush() == ""


def test_prompt_text_is_not_repeated(tokenizer):
    # The prompt's last tokens are decoding context only; output starts after them.
    assert "".join(stream(tokenizer, "日本", "語")) == "語"
