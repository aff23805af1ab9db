"""The router's side of the KV event stream: sequence checks, resync from dumps, liveness.

`EventStreams` is the pure part: it takes decoded batches and dumps with the
time they arrived, applies them to the PrefixIndex in order, and says which
workers need a dump. Per worker:

- the first batch after `seq` applies; a duplicate or older one is dropped;
  a heartbeat repeating `seq` only proves the worker alive;
- a gap (a batch past `seq + 1`, or a heartbeat past `seq`), a new publisher epoch or a
  malformed batch starts a resync: later batches are buffered, a dump is
  requested, and when it comes the worker's entries are replaced by it and
  the buffered batches past the dump's `seq` are applied;
- a worker that has not answered `max_dump_attempts` dump requests, or that
  sent nothing for `silence_timeout_s`, has its entries dropped from the
  index until it answers a dump again;
- anything from a worker that was not added is rejected.

Each of these is logged. `KVEventSubscriber` is the ZeroMQ adapter: one SUB
socket connected to every worker's PUB endpoint and one REQ socket per worker
for dumps, served by a background thread that holds `lock` while it touches
the index (the router holds the same lock while it selects).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from triton_disagg.router.config import SubscriberConfig
from triton_disagg.router.events import (
    EventBatch,
    MalformedEventError,
    WorkerDump,
    WorkerId,
    decode_batch,
    decode_dump,
    encode_dump_request,
)
from triton_disagg.router.index import PrefixIndex

logger = logging.getLogger(__name__)


class StreamState(enum.Enum):
    SYNCED = "synced"
    RESYNCING = "resyncing"


@dataclass(slots=True)
class _Stream:
    last_heard_s: float
    state: StreamState = StreamState.RESYNCING
    epoch: int = -1
    seq: int = 0
    dump_requested_s: float | None = None
    num_dump_attempts: int = 0
    #: The worker's entries were dropped from the index (unresponsive or silent).
    is_dropped: bool = False
    buffer: deque[EventBatch] = field(default_factory=deque)


@dataclass(slots=True, frozen=True)
class StreamStatus:
    """A worker's stream as the router sees it."""

    state: StreamState
    epoch: int
    seq: int
    num_buffered: int
    is_dropped: bool


class EventStreams:
    """Per-worker event ordering and resync over a PrefixIndex. Pure; not thread-safe.

    Every method takes the arrival time `now_s` (one monotonic clock) and
    mutates the index only for known workers. Outcomes are returned as
    strings and counted in `counts`.
    """

    def __init__(self, index: PrefixIndex, config: SubscriberConfig):
        self.index = index
        self.config = config
        self._streams: dict[WorkerId, _Stream] = {}
        #: Outcome -> how many times it happened.
        self.counts: dict[str, int] = {}

    def add_worker(self, worker_id: WorkerId, now_s: float) -> None:
        """Start following a worker: it is indexed after its first dump. Idempotent."""
        self.index.add_worker(worker_id)
        self._streams.setdefault(worker_id, _Stream(last_heard_s=now_s))

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Stop following a worker and drop it from the index. Idempotent."""
        self._streams.pop(worker_id, None)
        self.index.remove_worker(worker_id)

    def status(self, worker_id: WorkerId) -> StreamStatus:
        """Raises KeyError for a worker not added."""
        s = self._streams[worker_id]
        return StreamStatus(s.state, s.epoch, s.seq, len(s.buffer), s.is_dropped)

    def on_batch(self, batch: EventBatch, now_s: float) -> str:
        """Apply, buffer or drop one batch. Returns "applied", "heartbeat", "buffered",
        "stale", "gap", "restarted" or "unknown_worker"."""
        stream = self._stream(batch.worker_id)
        if stream is None:
            logger.warning("rejected KV events of unknown worker %r (seq %d)", batch.worker_id, batch.seq)
            return self._count("unknown_worker")
        stream.last_heard_s = now_s
        if stream.state is StreamState.RESYNCING:
            self._buffer(stream, batch)
            return self._count("buffered")
        if batch.epoch != stream.epoch:
            if batch.epoch < stream.epoch:
                logger.warning("worker %s: dropped batch of an older publisher epoch", batch.worker_id)
                return self._count("stale")
            logger.warning("worker %s: publisher restarted (new epoch); resynchronising", batch.worker_id)
            self._start_resync(stream, batch)
            return self._count("restarted")
        if batch.seq == stream.seq + 1 and batch.events:
            for event in batch.events:
                self.index.apply_event(batch.worker_id, event)
            stream.seq = batch.seq
            return self._count("applied")
        if batch.seq == stream.seq and not batch.events:
            return self._count("heartbeat")
        if batch.seq <= stream.seq:
            logger.warning(
                "worker %s: dropped out-of-order batch seq %d (at %d)", batch.worker_id, batch.seq, stream.seq
            )
            return self._count("stale")
        logger.warning(
            "worker %s: gap in KV events (seq %d after %d); resynchronising", batch.worker_id, batch.seq, stream.seq
        )
        self._start_resync(stream, batch)
        return self._count("gap")

    def on_dump(self, dump: WorkerDump, now_s: float) -> str:
        """Replace a resyncing worker's entries by its dump and replay what was buffered.

        Returns "resynced", "unsolicited" (the worker is in sync; ignored) or "unknown_worker".
        """
        stream = self._stream(dump.worker_id)
        if stream is None:
            logger.warning("rejected dump of unknown worker %r", dump.worker_id)
            return self._count("unknown_worker")
        stream.last_heard_s = now_s
        if stream.state is StreamState.SYNCED:
            return self._count("unsolicited")
        self.index.replace_worker(dump.worker_id, dump.entries, dump.media)
        buffered = sorted(stream.buffer, key=lambda b: (b.epoch, b.seq))
        stream.buffer.clear()
        stream.state, stream.epoch, stream.seq = StreamState.SYNCED, dump.epoch, dump.seq
        stream.dump_requested_s, stream.num_dump_attempts, stream.is_dropped = None, 0, False
        logger.info("worker %s: resynchronised at seq %d (%d blocks)", dump.worker_id, dump.seq, len(dump.entries))
        for batch in buffered:
            if (batch.epoch, batch.seq) > (dump.epoch, dump.seq):  # older ones are in the dump
                self.on_batch(batch, now_s)
        return self._count("resynced")

    def on_malformed(self, error: MalformedEventError, now_s: float) -> str:
        """A message that did not decode: resync its worker if known. Returns "resync" or "dropped"."""
        stream = self._stream(error.worker_id) if error.worker_id is not None else None
        if stream is None:
            logger.warning("dropped malformed KV message: %s", error)
            return self._count("dropped")
        logger.warning("worker %s: malformed KV events (%s); resynchronising", error.worker_id, error)
        stream.last_heard_s = now_s
        if stream.state is StreamState.SYNCED:
            self._start_resync(stream, None)
        return self._count("resync")

    def due_dump_requests(self, now_s: float) -> list[WorkerId]:
        """Workers to send a dump request now (first request, or the last one timed out).

        Marks them requested at `now_s`. A worker whose `max_dump_attempts`
        requests went unanswered has its entries dropped from the index.
        """
        due: list[WorkerId] = []
        for worker_id in list(self._streams):
            stream = self._stream(worker_id)
            if stream is None:
                continue
            if stream.state is not StreamState.RESYNCING:
                continue
            if stream.dump_requested_s is not None and now_s - stream.dump_requested_s < self.config.dump_timeout_s:
                continue
            if stream.num_dump_attempts >= self.config.max_dump_attempts and not stream.is_dropped:
                logger.warning(
                    "worker %s: %d dump requests unanswered; dropped from the index",
                    worker_id,
                    stream.num_dump_attempts,
                )
                self.index.clear_worker(worker_id)
                stream.is_dropped = True
                self._count("unresponsive")
            stream.num_dump_attempts += 1
            stream.dump_requested_s = now_s
            due.append(worker_id)
        return due

    def check_liveness(self, now_s: float) -> list[WorkerId]:
        """Drop from the index, and resync, the in-sync workers silent for `silence_timeout_s`."""
        silent: list[WorkerId] = []
        for worker_id in list(self._streams):
            stream = self._stream(worker_id)
            if stream is None or stream.state is not StreamState.SYNCED:
                continue
            silent_s = now_s - stream.last_heard_s
            if silent_s >= self.config.silence_timeout_s:
                logger.warning("worker %s: silent for %.1f s; dropped from the index", worker_id, silent_s)
                self.index.clear_worker(worker_id)
                stream.is_dropped = True
                self._start_resync(stream, None)
                silent.append(worker_id)
                self._count("silent")
        return silent

    def _stream(self, worker_id: WorkerId) -> _Stream | None:
        """The worker's stream, if it is followed and still in the index (the router may have removed it)."""
        stream = self._streams.get(worker_id)
        if stream is not None and not self.index.has_worker(worker_id):
            del self._streams[worker_id]
            return None
        return stream

    def _start_resync(self, stream: _Stream, batch: EventBatch | None) -> None:
        stream.state = StreamState.RESYNCING
        stream.dump_requested_s = None
        stream.num_dump_attempts = 0
        stream.buffer.clear()
        if batch is not None:
            stream.buffer.append(batch)
        self._count("resyncs")

    def _buffer(self, stream: _Stream, batch: EventBatch) -> None:
        if len(stream.buffer) >= self.config.max_buffered_batches:
            stream.buffer.popleft()  # the gap this leaves is found after the dump, and resynced again
            self._count("buffer_overflow")
        stream.buffer.append(batch)

    def _count(self, outcome: str) -> str:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        return outcome


class KVEventSubscriber:
    """ZeroMQ adapter around EventStreams: one background thread, started by the constructor.

    `add_worker`/`remove_worker` may be called from any thread; they take
    effect within `poll_interval_s`. Hold `lock` to read the index.
    """

    def __init__(
        self,
        index: PrefixIndex,
        config: SubscriberConfig | None = None,
        lock: threading.Lock | None = None,
        context: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config or SubscriberConfig()
        self.lock = lock or threading.Lock()
        self.streams = EventStreams(index, self.config)
        self._clock = clock
        self._context = context or zmq.Context.instance()
        self._commands: queue.SimpleQueue[tuple[str, WorkerId, str, str]] = queue.SimpleQueue()
        self._changed = threading.Condition(self.lock)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kv-subscriber", daemon=True)
        self._thread.start()

    def add_worker(self, worker_id: WorkerId, events_endpoint: str, dump_endpoint: str) -> None:
        """Follow a worker's PUB endpoint and ask its REP endpoint for a dump."""
        self._commands.put(("add", worker_id, events_endpoint, dump_endpoint))

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Stop following a worker and drop it from the index."""
        self._commands.put(("remove", worker_id, "", ""))

    def wait_until(self, predicate: Callable[[EventStreams], bool], timeout_s: float) -> bool:
        """Block until `predicate(streams)` holds (checked under the lock after each message); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.streams), timeout=timeout_s)

    def close(self) -> None:
        """Stop the thread and close the sockets (idempotent)."""
        self._stopping.set()
        self._thread.join()

    def __enter__(self) -> KVEventSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RCVHWM, 0)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        dump_sockets: dict[WorkerId, zmq.Socket] = {}
        events_endpoints: dict[WorkerId, str] = {}
        try:
            while not self._stopping.is_set():
                self._run_commands(sub, poller, dump_sockets, events_endpoints)
                ready = dict(poller.poll(timeout=self.config.poll_interval_s * 1000))
                if sub in ready:
                    self._receive_batches(sub)
                for worker_id, socket in list(dump_sockets.items()):
                    if socket in ready:
                        self._receive_dump(worker_id, socket)
                with self._changed:
                    now_s = self._clock()
                    self.streams.check_liveness(now_s)
                    for worker_id in self.streams.due_dump_requests(now_s):
                        try:
                            dump_sockets[worker_id].send(encode_dump_request(worker_id), zmq.NOBLOCK)
                        except zmq.Again:  # not connected yet: the request times out and is sent again
                            logger.info("worker %s: dump request not sent (no connection yet)", worker_id)
                    self._changed.notify_all()
        finally:
            for socket in [sub, *dump_sockets.values()]:
                socket.close(linger=0)

    def _run_commands(
        self,
        sub: zmq.Socket,
        poller: zmq.Poller,
        dump_sockets: dict[WorkerId, zmq.Socket],
        events_endpoints: dict[WorkerId, str],
    ) -> None:
        while True:
            try:
                command, worker_id, events_endpoint, dump_endpoint = self._commands.get_nowait()
            except queue.Empty:
                return
            if worker_id in dump_sockets:  # re-added or removed: undo the old connection first
                socket = dump_sockets.pop(worker_id)
                poller.unregister(socket)
                socket.close(linger=0)
                sub.disconnect(events_endpoints.pop(worker_id))
                with self.lock:
                    self.streams.remove_worker(worker_id)
            if command == "add":
                socket = self._context.socket(zmq.REQ)
                socket.setsockopt(zmq.REQ_RELAXED, 1)  # a timed-out request may be sent again
                socket.setsockopt(zmq.REQ_CORRELATE, 1)  # and a late reply to the old one is dropped
                socket.connect(dump_endpoint)
                poller.register(socket, zmq.POLLIN)
                dump_sockets[worker_id] = socket
                sub.connect(events_endpoint)
                events_endpoints[worker_id] = events_endpoint
                with self.lock:
                    self.streams.add_worker(worker_id, self._clock())

    def _receive_batches(self, sub: zmq.Socket) -> None:
        while True:
            try:
                payload = sub.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            try:
                batch = decode_batch(payload)
            except MalformedEventError as exc:
                with self.lock:
                    self.streams.on_malformed(exc, self._clock())
                continue
            with self.lock:
                self.streams.on_batch(batch, self._clock())

    def _receive_dump(self, worker_id: WorkerId, socket: zmq.Socket) -> None:
        payload = socket.recv()
        try:
            dump = decode_dump(payload)
            if dump.worker_id != worker_id:
                raise MalformedEventError(f"dump names worker {dump.worker_id!r}", worker_id)
        except MalformedEventError as exc:
            with self.lock:
                self.streams.on_malformed(MalformedEventError(str(exc), worker_id), self._clock())
            return
        with self.lock:
            self.streams.on_dump(dump, self._clock())
