"""Reading a worker's decoupled stream without hanging on a dead worker.

Triton 2.51 does not fail the requests in flight on a Python model whose stub
process died: their responses just never come. So a stream is read on a
thread of its own, and its reader waits on a queue: when no response came
for `probe_after_s`, it asks `probe()` whether the worker still answers, and
gives up on the stream (WorkerLost) when it does not, cancelling it (a gRPC
stream then ends; a BLS one keeps its thread blocked, holding only that
stream). That thread also makes, reads and drops every object of the stream
(`convert` turns each response into plain data).

A reader that falls behind may take what queued meanwhile as one item
(`merge`): a relay then sends one response for several tokens instead of
falling further behind, one round trip per token.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from triton_disagg.serving.migration import WorkerLost
from triton_disagg.serving.model_calls import ResponseStream

T = TypeVar("T")

_END = object()
_NONE = object()


def watched_stream(
    worker_name: str,
    start: Callable[[], ResponseStream],
    convert: Callable[[object], T],
    probe: Callable[[], str | None],
    probe_after_s: float,
    merge: Callable[[T, T], T | None] | None = None,
) -> Iterator[T]:
    """`convert(response)` for each response of the stream `start()` opens, in order.

    `probe()` answers None while the worker is alive, else why not ("dead", "gone"). Raises
    WorkerLost after a silence of `probe_after_s` and a failed probe; re-raises what `start`,
    the iteration or `convert` raised. With `merge`, items already queued when one is taken are
    folded into it (`merge(earlier, later)`; None: they do not merge, the later one comes next).
    """
    received: queue.SimpleQueue = queue.SimpleQueue()
    streams: list[ResponseStream] = []

    def pump() -> None:
        try:
            stream = start()
            streams.append(stream)
            for response in stream:
                received.put(convert(response))
            received.put(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which decides
            received.put(exc)

    threading.Thread(target=pump, name=f"stream-{worker_name}", daemon=True).start()
    held = _NONE  # an item taken while merging that did not merge: the next one
    while True:
        if held is not _NONE:
            item, held = held, _NONE
        else:
            try:
                item = received.get(timeout=probe_after_s)
            except queue.Empty:
                if (reason := probe()) is not None:
                    for stream in streams:
                        stream.cancel()
                    raise WorkerLost(worker_name, reason, f"no response for {probe_after_s:g} s and its probe failed") from None
                continue
        if item is _END:
            return
        if isinstance(item, Exception):
            raise item
        while merge is not None:
            try:
                later = received.get_nowait()
            except queue.Empty:
                break
            merged = None if later is _END or isinstance(later, Exception) else merge(item, later)
            if merged is None:
                held = later
                break
            item = merged
        yield item
