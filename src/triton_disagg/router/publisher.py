"""A worker's KV event publisher: ZeroMQ PUB of numbered event batches, REP of dumps.

The engine's worker calls `publish(block_manager.drain_events())` after each
step. Each non-empty call becomes one `EventBatch` with the next sequence
number. A background thread sends a heartbeat (an empty batch repeating the
last number) every `heartbeat_interval_s`, so routers notice a lost last
batch and a dead worker, and answers dump requests on the REP socket.

A dump is the publisher's mirror of the worker's cache: it applies every
batch it sends to a one-worker PrefixIndex, so the dump and its sequence
number agree exactly. A worker may instead pass `dump_fn` returning its
cached (hash, parent) pairs; the dump then carries the number of the last
batch sent before `dump_fn` ran, and because replaying stored/removed/cleared
events over a later state converges to the same set, the router ends up
consistent either way.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import zmq

from triton_disagg.router.config import PublisherConfig
from triton_disagg.router.events import (
    EventBatch,
    KVEvent,
    MalformedEventError,
    WorkerDump,
    WorkerId,
    decode_dump_request,
    encode_batch,
    encode_dump,
)
from triton_disagg.router.hashing import BlockHash
from triton_disagg.router.index import PrefixIndex

logger = logging.getLogger(__name__)

DumpFn = Callable[[], Iterable[tuple[BlockHash, BlockHash | None]]]


class KVEventPublisher:
    """Publishes one worker's KV events; thread-safe `publish`, one background thread.

    Binds both sockets in the constructor (raises zmq.ZMQError if an
    endpoint is taken); `events_endpoint`/`dump_endpoint` are the bound
    addresses (a `tcp://host:*` wildcard port resolved). `close()` stops the
    thread and closes the sockets.
    """

    def __init__(
        self,
        worker_id: WorkerId,
        config: PublisherConfig,
        dump_fn: DumpFn | None = None,
        context: zmq.Context | None = None,
    ):
        self.worker_id = worker_id
        self.config = config
        #: Identifies this publisher's life: a router seeing a new epoch resynchronises.
        self.epoch = time.time_ns()
        self._seq = 0
        self._dump_fn = dump_fn
        self._mirror = PrefixIndex(max_blocks_per_worker=sys.maxsize) if dump_fn is None else None
        if self._mirror is not None:
            self._mirror.add_worker(worker_id)
        self._lock = threading.Lock()  # orders seq numbers, PUB sends and the mirror
        context = context or zmq.Context.instance()
        self._pub = context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.send_hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(config.events_endpoint)
        self._rep = context.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._rep.bind(config.dump_endpoint)
        self.events_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dump_endpoint = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"kv-publisher-{worker_id}", daemon=True)
        self._thread.start()

    @property
    def seq(self) -> int:
        """Sequence number of the last batch sent (0 before any)."""
        return self._seq

    def publish(self, events: Sequence[KVEvent]) -> int:
        """Send `events` as the next batch; returns its seq (the current one if `events` is empty).

        Never blocks: beyond the send high-water mark ZeroMQ drops the batch,
        and routers resynchronise from a dump.
        """
        if not events:
            return self._seq
        with self._lock:
            self._seq += 1
            batch = EventBatch(self.worker_id, self.epoch, self._seq, tuple(events))
            if self._mirror is not None:
                for event in batch.events:
                    self._mirror.apply_event(self.worker_id, event)
            self._pub.send(encode_batch(batch, self.config.include_token_ids), copy=False)
            return self._seq

    def dump(self) -> WorkerDump:
        """The blocks routers should index now, with the seq they include."""
        with self._lock:
            seq = self._seq
            if self._mirror is not None:
                return WorkerDump(
                    self.worker_id,
                    self.epoch,
                    seq,
                    tuple(self._mirror.dump()[self.worker_id]),
                    tuple(self._mirror.dump_media()[self.worker_id]),
                )
        return WorkerDump(self.worker_id, self.epoch, seq, tuple(self._dump_fn()))  # type: ignore[misc]

    def close(self) -> None:
        """Stop the thread and close the sockets (idempotent)."""
        self._stopping.set()
        self._thread.join()
        with self._lock:
            self._pub.close()

    def __enter__(self) -> KVEventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._rep, zmq.POLLIN)
        interval_s = self.config.heartbeat_interval_s
        next_heartbeat_s = time.monotonic()
        try:
            while not self._stopping.is_set():
                if poller.poll(timeout=min(interval_s, 0.1) * 1000):
                    self._answer_dump_request()
                if time.monotonic() >= next_heartbeat_s:
                    with self._lock:
                        heartbeat = EventBatch(self.worker_id, self.epoch, self._seq, ())
                        self._pub.send(encode_batch(heartbeat))
                    next_heartbeat_s = time.monotonic() + interval_s
        finally:
            self._rep.close()

    def _answer_dump_request(self) -> None:
        payload = self._rep.recv()
        try:
            requested = decode_dump_request(payload)
            if requested != self.worker_id:
                raise MalformedEventError(f"dump request for {requested!r} reached worker {self.worker_id!r}")
        except MalformedEventError as exc:
            logger.warning("worker %s: rejected dump request: %s", self.worker_id, exc)
            self._rep.send(b"")  # REP must answer; an empty reply decodes as malformed
            return
        self._rep.send(encode_dump(self.dump()), copy=False)
