"""The served model as the frontend sees it: its tokenizer, context window and chat template.

Chat prompts are tokenized without the tokenizer's special tokens, as
transformers' `apply_chat_template` does: the template writes them itself.

Prompts are tokenized here only to check them against the context window and
count their tokens before the request reaches Triton; the `llm` model
tokenizes the same text with the same tokenizer.json, so the counts agree.

Chat prompts are rendered with the checkpoint's `chat_template` (from
tokenizer_config.json, as Hugging Face does), or with DEFAULT_CHAT_TEMPLATE
when the checkpoint has none:

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>

"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

from triton_disagg.frontend.protocol import invalid

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplate:
    """A Jinja chat template, rendered in a sandbox as transformers does."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not parse: {e}") from None
        self._special_tokens = special_tokens or {}

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages`, ending where the assistant's reply starts."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special_tokens)
        except jinja2.TemplateError as e:
            raise invalid(f"the chat template rejected these messages: {e}", "messages") from None


@dataclass(slots=True)
class ServedModel:
    """One model behind the frontend."""

    #: The name clients pass as `model`.
    name: str
    tokenizer: Tokenizer
    #: Longest prompt plus completion, in tokens.
    max_model_len: int
    chat_template: ChatTemplate
    created_s: int
    #: Largest max_tokens a request may ask for (the server's `--max-tokens-limit`); None: no limit.
    max_tokens_limit: int | None = None

    @classmethod
    def from_checkpoint(
        cls, name: str, path: Path, max_model_len: int | None = None, max_tokens_limit: int | None = None
    ) -> "ServedModel":
        """Read tokenizer.json, tokenizer_config.json and config.json of a Hugging Face checkpoint."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"model path {path} has no tokenizer.json")
        config = json.loads((path / "config.json").read_text())
        tokenizer_config_path = path / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_config_path.read_text()) if tokenizer_config_path.is_file() else {}
        special_tokens = {
            key: value if isinstance(value, str) else value.get("content", "")
            for key, value in tokenizer_config.items()
            if key in ("bos_token", "eos_token", "pad_token", "unk_token") and value
        }
        return cls(
            name=name,
            tokenizer=Tokenizer.from_file(str(path / "tokenizer.json")),
            max_model_len=max_model_len or int(config.get("max_position_embeddings", 2048)),
            chat_template=ChatTemplate(tokenizer_config.get("chat_template") or DEFAULT_CHAT_TEMPLATE, special_tokens),
            created_s=int((path / "config.json").stat().st_mtime),
            max_tokens_limit=max_tokens_limit,
        )

    def count_tokens(self, text: str, add_special_tokens: bool = True) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> int:
        """max_tokens to run with: as asked, or all the room the prompt leaves (up to max_tokens_limit).
        Raises OpenAIError (400)."""
        if max_tokens is not None and self.max_tokens_limit is not None and max_tokens > self.max_tokens_limit:
            raise invalid(f"max_tokens ({max_tokens}) is above this server's limit of {self.max_tokens_limit}", "max_tokens")
        room = self.max_model_len - num_prompt_tokens
        if room < 1:
            raise invalid(
                f"the prompt is {num_prompt_tokens} tokens long, which does not fit this model's context window of "
                f"{self.max_model_len} tokens; shorten it",
                param,
            )
        if max_tokens is None:
            return room if self.max_tokens_limit is None else min(room, self.max_tokens_limit)
        if max_tokens > room:
            raise invalid(
                f"max_tokens ({max_tokens}) is above the {room} tokens this prompt leaves: {num_prompt_tokens} prompt "
                f"tokens + max_tokens must fit the context window of {self.max_model_len} tokens",
                "max_tokens",
            )
        return max_tokens


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)

