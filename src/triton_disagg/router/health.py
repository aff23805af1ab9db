"""Which workers the router may choose: not reported dead, not silent on their KV event stream.

Triton keeps a model READY in its repository index after its Python stub
process died, so the index alone cannot tell a dead worker from a live one.
Two signals can, and `WorkerHealth` combines them (pure; no clocks, no I/O):

- a caller that saw the worker fail (its stub gone, its stream cut off)
  reports it with the worker's publisher epoch at that moment; the worker
  stays excluded until its KV event stream shows a new epoch (it was
  reloaded: a new engine, a new publisher) or it leaves the live set;
- a worker whose event stream went silent (no batch or heartbeat for the
  subscriber's `silence_timeout_s`) or stopped answering dump requests is
  excluded until it answers again, so a worker that dies unseen stops being
  chosen within that bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from triton_disagg.router.events import WorkerId
from triton_disagg.router.subscriber import StreamStatus

#: A stream status for a worker, or None where the router follows no KV events for it.
StatusOf = Callable[[WorkerId], "StreamStatus | None"]


@dataclass(slots=True)
class WorkerHealth:
    """Failure reports per worker, and the rule that turns them and stream status into routability."""

    #: worker -> its publisher epoch when it was reported failed (-1: no stream known then).
    _failed_epochs: dict[WorkerId, int] = field(default_factory=dict)

    def mark_failed(self, worker_id: WorkerId, status: StreamStatus | None) -> None:
        """Exclude `worker_id` until its stream shows an epoch other than the one in `status`."""
        self._failed_epochs[worker_id] = -1 if status is None else status.epoch

    def forget(self, worker_id: WorkerId) -> None:
        """Drop what is known of a worker (it left the live set; a later one of that name starts clean)."""
        self._failed_epochs.pop(worker_id, None)

    def is_routable(self, worker_id: WorkerId, status: StreamStatus | None) -> bool:
        """Whether `worker_id` may be chosen; clears a failure report its stream has outlived."""
        if status is not None and status.is_dropped:
            return False
        failed_epoch = self._failed_epochs.get(worker_id)
        if failed_epoch is None:
            return True
        if status is not None and status.epoch not in (failed_epoch, -1):
            del self._failed_epochs[worker_id]  # a new publisher: the worker was reloaded
            return True
        return False

    def routable(self, worker_ids: Iterable[WorkerId], status_of: StatusOf) -> list[WorkerId]:
        """The routable ones among `worker_ids`, in order."""
        return [w for w in worker_ids if self.is_routable(w, status_of(w))]

    @property
    def failed_worker_ids(self) -> list[WorkerId]:
        return sorted(self._failed_epochs)
