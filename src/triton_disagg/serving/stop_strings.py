"""Stop strings matched on streamed text."""

from __future__ import annotations

from collections.abc import Iterable


class StopStringMatcher:
    """Finds the first stop string in text that arrives in pieces.

    `feed` returns the text that is safe to emit: text that cannot be the
    start of a stop string. A tail that could still grow into one is held back
    until the next piece settles it, or until `flush`. On a match, the text up
    to (not including) the stop string is emitted and `is_stopped` turns true;
    later pieces are ignored.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stop_strings = tuple(s for s in stop_strings if s)
        self._pending = ""
        self.is_stopped = False

    def feed(self, text: str) -> str:
        """Take the next piece of text; return what may be emitted now."""
        if self.is_stopped:
            return ""
        if not self._stop_strings:
            return text
        buffer = self._pending + text
        # Everything before `_pending` was emitted, and `_pending` is the longest
        # tail that could begin a stop string, so any match starts inside `buffer`.
        match_at = min((i for i in (buffer.find(s) for s in self._stop_strings) if i >= 0), default=-1)
        if match_at >= 0:
            self.is_stopped = True
            self._pending = ""
            return buffer[:match_at]
        num_held = self._longest_partial_match(buffer)
        self._pending = buffer[len(buffer) - num_held :]
        return buffer[: len(buffer) - num_held]

    def flush(self) -> str:
        """Return the held-back tail; the text ended without completing a stop string."""
        pending, self._pending = self._pending, ""
        return pending

    def _longest_partial_match(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
