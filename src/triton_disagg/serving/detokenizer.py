"""Token ids to text, one delta at a time, without splitting a character."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT_CHAR = "\ufffd"

#: Prompt tokens decoded ahead of the output so that context-sensitive
#: decoders (SentencePiece's leading space, byte fallback) see what precedes it.
NUM_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Decodes a request's output tokens as they arrive.

    A multi-byte UTF-8 character may span several byte-level tokens; until its
    last byte arrives the decoded tail ends in U+FFFD, and that tail is held
    back. Each `push` decodes only a window of recent tokens: from
    `prefix_offset` (text already emitted, kept as context) to the end, and
    emits what lies past the text of `[prefix_offset, read_offset)`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids = list(prompt_token_ids[-NUM_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._token_ids)
        self._num_context_tokens = len(self._token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self._token_ids) - self._num_context_tokens

    def push(self, new_token_ids: Sequence[int]) -> str:
        """Append tokens; return the text they complete (possibly empty)."""
        self._token_ids.extend(new_token_ids)
        prefix_text, new_text = self._decode_window()
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the held-back tail, incomplete characters included as U+FFFD.

        Call once, when the request has finished.
        """
        prefix_text, new_text = self._decode_window()
        self._prefix_offset = self._read_offset = len(self._token_ids)
        return new_text[len(prefix_text) :]

    def _decode_window(self) -> tuple[str, str]:
        window = self._token_ids[self._prefix_offset :]
        num_prefix_tokens = self._read_offset - self._prefix_offset
        prefix_text = self._decode(window[:num_prefix_tokens])
        return prefix_text, self._decode(window)

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
