"""OpenAI request validation and prompt rendering of the frontend (no server)."""

import pytest
from pydantic import ValidationError

from triton_disagg.frontend.prompt import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ServedModel
from triton_disagg.frontend.protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from triton_disagg.checkpoint import make_model


def completion(**overrides) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi"} | overrides)


def chat(**overrides) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]} | overrides)


def test_defaults():
    request = completion()
    assert (request.max_tokens, request.temperature, request.top_p, request.top_k, request.n) == (None, 1.0, 1.0, 0, 1)
    assert request.stop_sequences == [] and not request.stream and not request.include_usage


def test_stop_and_usage_options():
    assert completion(stop="END").stop_sequences == ["END"]
    assert completion(stop=["a", "b"]).stop_sequences == ["a", "b"]
    assert completion(stream=True, stream_options={"include_usage": True}).include_usage
    assert completion(prompt=["one prompt"]).prompt_text == "one prompt"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"logprobs": 1}, "logprobs"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_completion_rejects(overrides, field):
    with pytest.raises(ValidationError) as caught:
        completion(**overrides)
    assert caught.value.errors()[0]["loc"][0] == field


def test_stream_options_need_stream():
    with pytest.raises(ValidationError, match="only allowed when stream is true"):
        completion(stream_options={"include_usage": True})


def test_chat_fields():
    request = chat(max_completion_tokens=9)
    assert request.requested_max_tokens == 9
    assert chat(max_tokens=4).requested_max_tokens == 4
    parts = chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.chat_messages() == [{"role": "user", "content": "ab"}]
    for bad in ({"max_tokens": 3, "max_completion_tokens": 4}, {"messages": []}, {"tools": [{"type": "function"}]},
                {"response_format": {"type": "json_object"}}, {"messages": [{"role": "robot", "content": "x"}]}):  # fmt: skip
        with pytest.raises(ValidationError):
            chat(**bad)


def test_default_chat_template():
    rendered = ChatTemplate(DEFAULT_CHAT_TEMPLATE).render(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello"}]
    )
    assert rendered == "<|system|>\nBe terse.\n<|user|>\nHello\n<|assistant|>\n"


def test_template_errors_become_a_400():
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(OpenAIError) as caught:
        template.render([{"role": "assistant", "content": "x"}])
    assert caught.value.status_code == 400 and "first must be user" in caught.value.message
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_context_window_arithmetic(tmp_path):
    """Context 4096 (the default model): a 4000-token prompt leaves 96; max_tokens None takes all 96."""
    served = ServedModel.from_checkpoint("tiny", make_model(tmp_path / "m"))
    assert served.max_model_len == 4096 and served.count_tokens("abc") == served.count_tokens("abc", add_special_tokens=False) + 1
    assert served.check_fits(4000, None, "prompt") == 96
    assert served.check_fits(4000, 96, "prompt") == 96
    with pytest.raises(OpenAIError, match="above the 96 tokens"):
        served.check_fits(4000, 97, "prompt")
    with pytest.raises(OpenAIError, match="does not fit"):
        served.check_fits(4096, 1, "prompt")


def test_a_max_tokens_limit_caps_requests_and_defaults(tmp_path):
    served = ServedModel.from_checkpoint("tiny", make_model(tmp_path / "m"), max_tokens_limit=64)
    assert served.check_fits(10, None, "prompt") == 64
    assert served.check_fits(10, 64, "prompt") == 64
    with pytest.raises(OpenAIError, match="above this server's limit of 64") as raised:
        served.check_fits(10, 65, "prompt")
    assert (raised.value.status_code, raised.value.param) == (400, "max_tokens")
