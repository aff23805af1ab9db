"""KV cache events a worker publishes so routers can index what it holds.

Shapes follow vLLM's KV events (and Dynamo's indexer input): a stored event
names a run of consecutive blocks by hash, with the parent of the first, and
the `medium` (storage tier) the blocks were stored in or removed from: the
device pool, host memory or disk. A block may be held in several media at
once; each medium's store and removal pair up on their own.

On the wire (ZeroMQ, msgpack) events travel in batches: one `EventBatch` per
publish call, numbered per worker by `seq` (1, 2, ...) within an `epoch` (the
publisher's start time), so a router sees gaps, duplicates and restarts. A
router that lost events asks the worker for a `WorkerDump`: every block it
holds, with the `seq` of the last batch the dump includes. The decoders
validate everything and raise MalformedEventError, never return a half-read
object.
"""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass, fields
from typing import NewType

import msgpack

from triton_disagg.router.hashing import BlockHash

#: A worker's name as the router knows it (its Triton model name, e.g. "prefill_0").
WorkerId = NewType("WorkerId", str)

#: Version tag of the msgpack layouts below. Version 2 added the medium of
#: stored and removed blocks; a decoder reads versions 1 (every block on the
#: device) and 2, and refuses any other.
WIRE_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class Medium(str, enum.Enum):
    """Where a worker holds a KV block: its device pool, host memory, or local disk.

    The order is the tiers' order: a prefix-cache lookup walks device, host, disk.
    """

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"

    @property
    def bit(self) -> int:
        """This medium's bit in a media mask (device 1, host 2, disk 4)."""
        return _MEDIUM_BITS[self]


_MEDIUM_BITS = {Medium.DEVICE: 1, Medium.HOST: 2, Medium.DISK: 4}
_MEDIA_BY_NAME = {medium.value: medium for medium in Medium}
#: Every bit a media mask may have set.
ALL_MEDIA_MASK = 7


@dataclass(slots=True, frozen=True)
class BlockStored:
    """Blocks that became reusable prefix cache in `medium`, in prefix order.

    `parent_block_hash` is the hash of the block before `block_hashes[0]`
    (None when the run starts at the sequence's first block). `token_ids` is
    empty when the publisher leaves tokens off the wire (the router only
    needs hashes).
    """

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: Medium = Medium.DEVICE


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    """Blocks dropped from `medium`; other media of the worker may still hold them."""

    block_hashes: tuple[BlockHash, ...]
    medium: Medium = Medium.DEVICE


@dataclass(slots=True, frozen=True)
class AllCleared:
    """The worker dropped its whole prefix cache (reset or reload)."""


KVEvent = BlockStored | BlockRemoved | AllCleared


@dataclass(slots=True)
class EventBatch:
    """The events of one publish call of one worker, with its sequence number.

    A batch without events is a heartbeat: it repeats the last `seq` sent.
    Not frozen: the router decodes one per message, and a frozen dataclass
    costs three times as much to build.
    """

    worker_id: WorkerId
    epoch: int
    seq: int
    events: tuple[KVEvent, ...]


@dataclass(slots=True, frozen=True)
class WorkerDump:
    """Every block a worker holds, after applying its batches up to `seq` of `epoch`.

    `entries` are (block hash, parent hash) pairs, least recently stored first.
    `media` lists (block hash, media mask) for the entries held anywhere but
    exactly the device pool (mask bits: `Medium.bit`); the others are on the device only.
    """

    worker_id: WorkerId
    epoch: int
    seq: int
    entries: tuple[tuple[BlockHash, BlockHash | None], ...]
    media: tuple[tuple[BlockHash, int], ...] = ()


class MalformedEventError(ValueError):
    """Bytes that are not a valid event batch, dump or dump request of this wire version.

    `worker_id` is the sender when the header was readable (the router then
    resynchronises that worker), else None.
    """

    def __init__(self, message: str, worker_id: WorkerId | None = None):
        super().__init__(message)
        self.worker_id = worker_id


_STORED, _REMOVED, _CLEARED = 0, 1, 2
_DUMP_REQUEST = "dump"
_MAX_HASH = (1 << 64) - 1


def encode_batch(batch: EventBatch, include_token_ids: bool = True) -> bytes:
    """msgpack bytes of `batch`: [version, worker_id, epoch, seq, [event, ...]].

    A stored event is [0, hashes, parent, token_ids, block_size, medium], a
    removed one [1, hashes, medium], a cleared one [2] (medium by name:
    "device", "host", "disk"). Raises TypeError for a non-event.
    """
    events: list[list] = []
    for event in batch.events:
        if type(event) is BlockStored:
            tokens = event.token_ids if include_token_ids else ()
            events.append(
                [_STORED, event.block_hashes, event.parent_block_hash, tokens, event.block_size, event.medium.value]
            )
        elif type(event) is BlockRemoved:
            events.append([_REMOVED, event.block_hashes, event.medium.value])
        elif type(event) is AllCleared:
            events.append([_CLEARED])
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")
    return msgpack.packb([WIRE_VERSION, batch.worker_id, batch.epoch, batch.seq, events])


def decode_batch(payload: bytes) -> EventBatch:
    """The EventBatch in `payload`. O(blocks + tokens). Raises MalformedEventError."""
    raw = _unpack(payload)
    if type(raw) is not tuple or len(raw) != 5 or type(raw[0]) is not int or raw[0] not in _READABLE_VERSIONS:
        raise MalformedEventError(f"not a version {WIRE_VERSION} event batch")
    version, worker_id, epoch, seq, raw_events = raw
    _check_header(worker_id, epoch, seq)
    try:
        if type(raw_events) is not tuple:
            raise MalformedEventError("events are not a list")
        events = tuple([_decode_event(item, version) for item in raw_events])
    except MalformedEventError as exc:
        raise MalformedEventError(f"worker {worker_id!r} seq {seq}: {exc}", WorkerId(worker_id)) from None
    return EventBatch(WorkerId(worker_id), epoch, seq, events)


def encode_dump(dump: WorkerDump) -> bytes:
    """msgpack bytes of `dump`: [version, worker_id, epoch, seq, hashes, parents, [[hash, mask], ...]]."""
    hashes = [block_hash for block_hash, _ in dump.entries]
    parents = [parent for _, parent in dump.entries]
    media = [list(item) for item in dump.media]
    return msgpack.packb([WIRE_VERSION, dump.worker_id, dump.epoch, dump.seq, hashes, parents, media])


def decode_dump(payload: bytes) -> WorkerDump:
    """The WorkerDump in `payload`. O(entries). Raises MalformedEventError."""
    raw = _unpack(payload)
    # Version 1 has no media list: [version, worker_id, epoch, seq, hashes, parents].
    if type(raw) is not tuple or not raw or type(raw[0]) is not int or (raw[0], len(raw)) not in ((1, 6), (2, 7)):
        raise MalformedEventError(f"not a version {WIRE_VERSION} worker dump")
    worker_id, epoch, seq, hashes, parents = raw[1:6]
    raw_media = raw[6] if len(raw) > 6 else ()
    _check_header(worker_id, epoch, seq)
    if type(hashes) is not tuple or type(parents) is not tuple or len(hashes) != len(parents):
        raise MalformedEventError(f"dump of worker {worker_id!r}: hashes and parents must be lists of one length")
    _check_hashes(hashes)
    _check_hashes(tuple(parent for parent in parents if parent is not None))
    if type(raw_media) is not tuple or any(
        type(item) is not tuple or len(item) != 2 or type(item[1]) is not int or not 0 < item[1] <= ALL_MEDIA_MASK
        for item in raw_media
    ):
        raise MalformedEventError(f"dump of worker {worker_id!r}: media must be [hash, mask 1..7] pairs")
    _check_hashes(tuple(item[0] for item in raw_media))
    return WorkerDump(WorkerId(worker_id), epoch, seq, tuple(zip(hashes, parents)), tuple(raw_media))


def encode_dump_request(worker_id: WorkerId) -> bytes:
    """msgpack bytes asking `worker_id` for its WorkerDump."""
    return msgpack.packb([WIRE_VERSION, _DUMP_REQUEST, worker_id])


def decode_dump_request(payload: bytes) -> WorkerId:
    """The worker a dump request names. Raises MalformedEventError."""
    raw = _unpack(payload)
    if type(raw) is not tuple or len(raw) != 3 or raw[0] not in _READABLE_VERSIONS or raw[1] != _DUMP_REQUEST:
        raise MalformedEventError(f"not a version {WIRE_VERSION} dump request")
    if type(raw[2]) is not str or not raw[2]:
        raise MalformedEventError("dump request names no worker")
    return WorkerId(raw[2])


def _unpack(payload: bytes) -> object:
    try:  # arrays as tuples: the hashes go into the events without a copy
        return msgpack.unpackb(payload, use_list=False, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # ExtraData, FormatError, StackError
        raise MalformedEventError(f"undecodable msgpack: {exc}") from None


def _check_header(worker_id: object, epoch: object, seq: object) -> None:
    if type(worker_id) is not str or not worker_id:
        raise MalformedEventError(f"worker id must be a non-empty string, got {worker_id!r}")
    if type(epoch) is not int or epoch < 0 or type(seq) is not int or seq < 0:
        raise MalformedEventError(f"epoch and seq must be non-negative integers, got {epoch!r}, {seq!r}")


def _check_hashes(hashes: tuple) -> None:
    try:
        array("Q", hashes)  # each an int in [0, 2**64), checked in C
    except (TypeError, OverflowError) as exc:
        raise MalformedEventError(f"block hashes must be unsigned 64-bit integers: {exc}") from None


# BlockStored is a frozen dataclass, whose __init__ sets each field through
# object.__setattr__; the decoder, which builds one per event on the router's
# hot path, fills the slots directly (about half the cost).
_new_object = object.__new__
_set_hashes, _set_parent, _set_token_ids, _set_block_size, _set_medium = (
    BlockStored.__dict__[f.name].__set__ for f in fields(BlockStored)
)


def _decode_medium(raw: tuple, version: int, index: int) -> Medium:
    if version == 1:
        return Medium.DEVICE
    medium = _MEDIA_BY_NAME.get(raw[index]) if type(raw[index]) is str else None
    if medium is None:
        raise MalformedEventError(f"medium must be one of device, host, disk, got {raw[index]!r:.40}")
    return medium


def _decode_event(raw: object, version: int) -> KVEvent:
    if type(raw) is not tuple or not raw or type(raw[0]) is not int:
        raise MalformedEventError(f"event must be a list starting with its tag, got {raw!r:.80}")
    tag = raw[0]
    extra = version - 1  # version 2 appends the medium to stored and removed events
    if tag == _STORED and len(raw) == 5 + extra:
        _, hashes, parent, token_ids, block_size = raw[:5]
        if type(hashes) is not tuple or not hashes:
            raise MalformedEventError("a stored event names no blocks")
        _check_hashes(hashes)
        if parent is not None and (type(parent) is not int or not 0 <= parent <= _MAX_HASH or parent in hashes):
            raise MalformedEventError(f"parent hash must be an unsigned 64-bit integer outside the run, got {parent!r}")
        if type(block_size) is not int or block_size < 1:
            raise MalformedEventError(f"block_size must be a positive integer, got {block_size!r}")
        if type(token_ids) is not tuple or (token_ids and len(token_ids) != len(hashes) * block_size):
            raise MalformedEventError(f"token_ids must be empty or {len(hashes)} x {block_size} token ids")
        if token_ids:
            try:
                array("I", token_ids)
            except (TypeError, OverflowError) as exc:
                raise MalformedEventError(f"token ids must be unsigned 32-bit integers: {exc}") from None
        event = _new_object(BlockStored)
        _set_hashes(event, hashes)
        _set_parent(event, parent)
        _set_token_ids(event, token_ids)
        _set_block_size(event, block_size)
        _set_medium(event, _decode_medium(raw, version, 5))
        return event
    if tag == _REMOVED and len(raw) == 2 + extra:
        if type(raw[1]) is not tuple or not raw[1]:
            raise MalformedEventError("a removed event names no blocks")
        _check_hashes(raw[1])
        return BlockRemoved(raw[1], _decode_medium(raw, version, 2))
    if tag == _CLEARED and len(raw) == 1:
        return AllCleared()
    raise MalformedEventError(f"unknown event {raw!r:.80}")
