"""Worker load as the router sees it: what it routed, and what workers report.

`LoadTracker` counts each routed request's prompt tokens on its prefill
worker until the first token, and its blocks on its decode worker until it
completes; a worker's own report (`WorkerMetrics`) raises those figures
when it knows more (load from elsewhere, or after a router restart).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from triton_disagg.router.events import WorkerId


@dataclass(slots=True, frozen=True)
class WorkerMetrics:
    """A worker's own report of its load."""

    active_decode_blocks: int
    queued_prefill_tokens: int
    #: KV blocks in its pool; needed by the `max_decode_block_usage` threshold.
    capacity_blocks: int | None = None


@dataclass(slots=True, frozen=True)
class WorkerLoad:
    """The load selection uses for one worker."""

    worker_id: WorkerId
    active_decode_blocks: int
    queued_prefill_tokens: int
    capacity_blocks: int | None = None
    #: Decode blocks routed here, decayed over `load_decay_s`: the second tie-breaker.
    recent_blocks: float = 0.0

    def num_load_blocks(self, block_size: int) -> float:
        """Decode blocks plus queued prefill, in blocks: the tie-breaker."""
        return self.active_decode_blocks + self.queued_prefill_tokens / block_size


@dataclass(slots=True)
class _Tracked:
    queued_prefill_tokens: int = 0
    active_decode_blocks: int = 0
    reported: WorkerMetrics | None = None
    recent_blocks: float = 0.0  # as of recent_at_s
    recent_at_s: float = 0.0
    num_requests: int = 0  # routed here (to prefill or decode) and not complete


@dataclass(slots=True, frozen=True)
class _Active:
    prefill_worker_id: WorkerId
    decode_worker_id: WorkerId
    num_prefill_tokens: int
    num_decode_blocks: int


class LoadTracker:
    """Active prefill tokens and decode blocks per worker, as routed by this router.

    All calls O(1) except `remove_worker`, O(active requests).
    Unknown request ids are ignored (a request finished twice, or routed
    before a restart), so lifecycle calls are idempotent. Times are seconds
    on the caller's monotonic clock.
    """

    def __init__(self, load_decay_s: float = 60.0) -> None:
        if load_decay_s <= 0:
            raise ValueError(f"load_decay_s must be > 0, got {load_decay_s}")
        self.load_decay_s = load_decay_s
        self._workers: dict[WorkerId, _Tracked] = {}
        self._requests: dict[str, _Active] = {}
        self._prefilling: set[str] = set()

    def add_worker(self, worker_id: WorkerId) -> None:
        self._workers.setdefault(worker_id, _Tracked())

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget a worker and the requests routed to it."""
        self._workers.pop(worker_id, None)
        gone = [rid for rid, r in self._requests.items() if worker_id in (r.prefill_worker_id, r.decode_worker_id)]
        for request_id in gone:
            self.complete(request_id)

    def add(
        self,
        request_id: str,
        prefill_worker_id: WorkerId,
        decode_worker_id: WorkerId,
        num_prefill_tokens: int,
        num_decode_blocks: int,
        now_s: float = 0.0,
    ) -> None:
        """Count a routed request; raises ValueError if its id is already active."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} is already routed; request ids must be unique")
        prefill, decode = self._worker(prefill_worker_id), self._worker(decode_worker_id)
        self._requests[request_id] = _Active(prefill_worker_id, decode_worker_id, num_prefill_tokens, num_decode_blocks)
        self._prefilling.add(request_id)
        prefill.queued_prefill_tokens += num_prefill_tokens
        decode.active_decode_blocks += num_decode_blocks
        prefill.num_requests += 1
        if decode is not prefill:
            decode.num_requests += 1
        decode.recent_blocks = self._decayed(decode, now_s) + num_decode_blocks
        decode.recent_at_s = max(now_s, decode.recent_at_s)

    def prefill_done(self, request_id: str) -> None:
        """The request's first token came: its prompt no longer waits for prefill."""
        if request_id in self._prefilling:
            self._prefilling.discard(request_id)
            active = self._requests[request_id]
            if active.prefill_worker_id in self._workers:
                self._workers[active.prefill_worker_id].queued_prefill_tokens -= active.num_prefill_tokens

    def complete(self, request_id: str) -> None:
        """The request finished (or failed): remove all its load."""
        self.prefill_done(request_id)
        active = self._requests.pop(request_id, None)
        if active is None:
            return
        if active.decode_worker_id in self._workers:
            self._workers[active.decode_worker_id].active_decode_blocks -= active.num_decode_blocks
        for worker_id in {active.prefill_worker_id, active.decode_worker_id}:
            if worker_id in self._workers:
                self._workers[worker_id].num_requests -= 1

    def refresh(self, worker_id: WorkerId, metrics: WorkerMetrics) -> None:
        """Record a worker's reported load (replacing its previous report)."""
        self._worker(worker_id).reported = metrics

    def load_of(self, worker_id: WorkerId, now_s: float = 0.0) -> WorkerLoad:
        """Load of a known worker at `now_s`: per field, the larger of tracked and reported."""
        tracked = self._worker(worker_id)
        reported = tracked.reported
        recent_blocks = self._decayed(tracked, now_s)
        if reported is None:
            return WorkerLoad(
                worker_id, tracked.active_decode_blocks, tracked.queued_prefill_tokens, None, recent_blocks
            )
        return WorkerLoad(
            worker_id,
            max(tracked.active_decode_blocks, reported.active_decode_blocks),
            max(tracked.queued_prefill_tokens, reported.queued_prefill_tokens),
            reported.capacity_blocks,
            recent_blocks,
        )

    @property
    def num_active_requests(self) -> int:
        return len(self._requests)

    def num_requests_on(self, worker_id: WorkerId) -> int:
        """Requests routed to a known worker, for prefill or decode, whose `complete` has not come.

        Counted from `add`, so a request still on its way to the worker counts.
        Raises KeyError for an unknown worker.
        """
        return self._worker(worker_id).num_requests

    def _decayed(self, tracked: _Tracked, now_s: float) -> float:
        elapsed_s = max(now_s - tracked.recent_at_s, 0.0)
        return tracked.recent_blocks * math.exp(-elapsed_s / self.load_decay_s) if tracked.recent_blocks else 0.0

    def _worker(self, worker_id: WorkerId) -> _Tracked:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise KeyError(f"worker {worker_id!r} is not known to the load tracker") from None
