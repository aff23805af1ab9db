"""Sends many streams' responses from one thread, merging what a stream queued while the thread was busy.

A decoupled Triton model sends each response with a synchronous round trip
to the server. Done on the thread that produced the tokens (the engine loop,
a relay thread), that round trip delays the next step; done one response per
token, it caps a stream's tokens/s. A `CoalescingSender` takes both off the
producer: `push` queues a payload and returns, the sender thread sends it,
and payloads a stream accumulates while the thread is busy with others are
merged into one response (several tokens, or a longer text delta). An idle
sender sends each payload as soon as it arrives, so a lone stream keeps its
per-token latency; a loaded one sends fewer, larger responses instead of
falling behind.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

P = TypeVar("P")


@dataclass(slots=True)
class _Pending(Generic[P]):
    payload: P
    is_final: bool


class CoalescingSender(Generic[P]):
    """One sender thread for many streams.

    `send(key, payload, is_final)` runs on the sender thread, in push order
    per stream, never twice at once. `merge(earlier, later)` folds a stream's
    queued payloads into one. If `send` raises, `on_error(key, exc)` runs and
    the stream's later payloads are dropped (its consumer is gone or broken).
    """

    def __init__(
        self,
        name: str,
        send: Callable[[Hashable, P, bool], None],
        merge: Callable[[P, P], P],
        on_error: Callable[[Hashable, Exception], None],
    ) -> None:
        self._send = send
        self._merge = merge
        self._on_error = on_error
        self._cond = threading.Condition()
        self._pending: dict[Hashable, _Pending[P]] = {}
        self._order: deque[Hashable] = deque()  # streams with something pending, oldest first
        self._failed: set[Hashable] = set()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def push(self, key: Hashable, payload: P, is_final: bool = False) -> None:
        """Queue `payload` for stream `key`; `is_final` ends the stream after it is sent."""
        with self._cond:
            if key in self._failed:
                if is_final:
                    self._failed.discard(key)
                return
            pending = self._pending.get(key)
            if pending is None:
                self._pending[key] = _Pending(payload, is_final)
                self._order.append(key)
                self._cond.notify()
            else:
                if pending.is_final:
                    raise RuntimeError(f"stream {key!r} got a payload after its final one")
                pending.payload = self._merge(pending.payload, payload)
                pending.is_final = is_final

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop the thread (waits up to `timeout_s`)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._order and not self._closing:
                    self._cond.wait()
                if not self._order:
                    return
                key = self._order.popleft()
                pending = self._pending.pop(key)
            try:
                self._send(key, pending.payload, pending.is_final)
            except Exception as exc:  # noqa: BLE001 - the stream's consumer failed; the others go on
                with self._cond:
                    dropped = self._pending.pop(key, None)
                    if dropped is not None:
                        self._order.remove(key)
                    if not (pending.is_final or (dropped is not None and dropped.is_final)):
                        self._failed.add(key)  # until its final payload arrives
                try:
                    self._on_error(key, exc)
                except Exception:  # noqa: BLE001 - never let one stream's handler stop the thread
                    logger.exception("error handler of stream %r failed", key)
