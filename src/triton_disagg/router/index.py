"""Prefix index: which worker holds which cached KV blocks, fed by KV events.

Block hashes are chained (a hash names its whole prefix), so the index needs
no tree: each worker has a map from block hash to parent hash. Routing asks
how many leading blocks of a request each worker holds.

Per worker the index also counts *orphans*: held blocks whose parent is not
held. A worker with no orphans holds a prefix-closed set (every block's
parent is held too), so along a request's hash chain its held blocks are a
leading run and `find_matches` finds the run's end by binary search. A worker
with orphans (a block removed from the middle of a chain, or the index's own
memory cap evicting a parent) is matched by a linear walk instead. The
engine evicts a block's descendants before the block itself, so orphans are
rare, and the answer is exact either way.

Memory is bounded: each worker keeps at most `max_blocks_per_worker` entries;
past that it drops its least recently stored ones, down to 7/8 of the cap
in one go so the cost per stored block stays O(1) (a stored run is
recorded tail first, so a chain's tail goes before its head, as in the
engine). A dropped entry only makes the index under-report that worker's
overlap; it never reports a block the worker did not announce.

Each entry also records the media (storage tiers) the worker holds the
block in: its device pool, host memory, disk. An entry lives while any
medium holds it; `find_tiered_matches` splits a worker's overlap by the
best medium of each block, so a router can credit a block that must be
brought back from host memory or disk less than one already on the device.
Only entries held anywhere but exactly the device pool cost extra memory.

The index is not thread-safe: one thread mutates it, or callers hold a lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, takewhile

from triton_disagg.router.events import ALL_MEDIA_MASK, AllCleared, BlockRemoved, BlockStored, KVEvent, Medium, WorkerId
from triton_disagg.router.hashing import BlockHash

#: Default for `max_blocks_per_worker`: 262,144 blocks (about 4M tokens at a
#: 16-token block), some 40 MB of index per worker.
DEFAULT_MAX_BLOCKS_PER_WORKER = 1 << 18

_NOT_HELD = object()
_DEVICE, _HOST = Medium.DEVICE.bit, Medium.HOST.bit


@dataclass(slots=True, frozen=True)
class TierMatch:
    """A worker's leading prompt blocks, split by the best medium holding each (device > host > disk)."""

    num_device: int
    num_host: int = 0
    num_disk: int = 0

    @property
    def num_blocks(self) -> int:
        return self.num_device + self.num_host + self.num_disk

    def credit(self, host_weight: float, disk_weight: float) -> float:
        """Blocks as worth a device hit: a host block counts `host_weight`, a disk block `disk_weight`."""
        return self.num_device + host_weight * self.num_host + disk_weight * self.num_disk


class UnknownWorkerError(KeyError):
    """An event or dump named a worker the index has not been told about (`add_worker`)."""


@dataclass(slots=True)
class _WorkerBlocks:
    """One worker's cached blocks: hash -> parent hash, least recently stored first."""

    parents: dict[BlockHash, BlockHash | None] = field(default_factory=dict)
    #: Held children per parent hash, whether or not the parent is held.
    num_children: dict[BlockHash, int] = field(default_factory=dict)
    #: Held blocks whose (non-None) parent is not held.
    num_orphans: int = 0
    #: Media mask of each held block that is anywhere but exactly the device (absent: device only).
    media: dict[BlockHash, int] = field(default_factory=dict)
    #: Held blocks the device does not hold (only host memory or disk).
    num_off_device: int = 0


class PrefixIndex:
    """Cached-block index over many workers; answers prefix overlaps per worker.

    Complexity, with B the blocks in an event or dump, D a request's length in
    blocks, H the workers holding its first block, N a worker's entries:
    `apply_event` stored/removed O(B), cleared O(N); `find_matches`
    O(H log D) (O(H D) for workers with orphans); `remove_worker` O(N);
    `dump` O(total entries).
    """

    def __init__(self, max_blocks_per_worker: int = DEFAULT_MAX_BLOCKS_PER_WORKER):
        if max_blocks_per_worker < 1:
            raise ValueError(f"max_blocks_per_worker must be >= 1, got {max_blocks_per_worker}")
        self.max_blocks_per_worker = max_blocks_per_worker
        self._workers: dict[WorkerId, _WorkerBlocks] = {}
        # First blocks of sequences (parent None) -> workers holding them: the
        # candidates of a match, since a request's hash chain starts at one.
        self._root_holders: dict[BlockHash, set[WorkerId]] = {}
        #: Entries dropped by the per-worker cap since creation.
        self.num_capped_blocks = 0

    # -- workers -----------------------------------------------------------------

    @property
    def worker_ids(self) -> list[WorkerId]:
        return list(self._workers)

    def has_worker(self, worker_id: WorkerId) -> bool:
        return worker_id in self._workers

    def add_worker(self, worker_id: WorkerId) -> None:
        """Register a worker (no blocks). Idempotent: a known worker keeps its blocks."""
        self._workers.setdefault(worker_id, _WorkerBlocks())

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget a worker and all its blocks, O(N). Unknown workers are ignored."""
        if worker_id in self._workers:
            self.clear_worker(worker_id)
            del self._workers[worker_id]

    def clear_worker(self, worker_id: WorkerId) -> None:
        """Drop a known worker's blocks but keep it registered, O(N). Raises UnknownWorkerError."""
        blocks = self._blocks(worker_id)
        for block_hash, parent in blocks.parents.items():
            if parent is None:
                self._discard_root(block_hash, worker_id)
        self._workers[worker_id] = _WorkerBlocks()

    def num_blocks(self, worker_id: WorkerId) -> int:
        """Entries held for a known worker. Raises UnknownWorkerError."""
        return len(self._blocks(worker_id).parents)

    # -- events ------------------------------------------------------------------

    def apply_event(self, worker_id: WorkerId, event: KVEvent) -> None:
        """Apply one KV event of `worker_id`.

        Stored blocks already held are refreshed (moved to most recently
        stored); removing a block the worker does not hold is a no-op (its
        store may have been capped away). Raises UnknownWorkerError for a
        worker not added, TypeError for an object that is not a KV event.
        """
        blocks = self._workers.get(worker_id)
        if blocks is None:
            raise UnknownWorkerError(worker_id)
        if type(event) is BlockStored:
            self._store(worker_id, blocks, event.block_hashes, event.parent_block_hash, event.medium.bit)
        elif type(event) is BlockRemoved:
            self._remove(worker_id, blocks, event.block_hashes, event.medium.bit)
        elif type(event) is AllCleared:
            self.clear_worker(worker_id)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def store_blocks(
        self,
        worker_id: WorkerId,
        block_hashes: Sequence[BlockHash],
        parent_block_hash: BlockHash | None = None,
        medium: Medium = Medium.DEVICE,
    ) -> None:
        """Same as applying BlockStored(block_hashes, parent_block_hash, ..., medium), without building the event."""
        self._store(worker_id, self._blocks(worker_id), block_hashes, parent_block_hash, medium.bit)

    def remove_blocks(
        self, worker_id: WorkerId, block_hashes: Iterable[BlockHash], medium: Medium = Medium.DEVICE
    ) -> None:
        """Same as applying BlockRemoved(block_hashes, medium)."""
        self._remove(worker_id, self._blocks(worker_id), block_hashes, medium.bit)

    def replace_worker(
        self,
        worker_id: WorkerId,
        entries: Iterable[tuple[BlockHash, BlockHash | None]],
        media: Iterable[tuple[BlockHash, int]] = (),
    ) -> None:
        """Set a known worker's blocks to `entries` ((hash, parent) pairs, least recent first), as after a dump.

        `media` gives (hash, media mask) for entries not on the device only
        (as `dump_media` lists them); masks of hashes not in `entries` are ignored.
        """
        self.clear_worker(worker_id)
        blocks = self._workers[worker_id]
        for block_hash, parent in entries:
            self._store(worker_id, blocks, (block_hash,), parent, _DEVICE)
        for block_hash, mask in media:
            if block_hash in blocks.parents and 0 < mask <= ALL_MEDIA_MASK:
                self._set_mask(blocks, block_hash, _DEVICE, mask)

    # -- queries -----------------------------------------------------------------

    def find_matches(self, block_hashes: Sequence[BlockHash]) -> dict[WorkerId, int]:
        """Leading blocks of `block_hashes` each worker holds; workers with none are left out.

        `block_hashes` is a request's hash chain from its first block (as
        `hash_request_tokens` returns it). O(H log D); no side effects.
        """
        if not block_hashes:
            return {}
        holders = self._root_holders.get(block_hashes[0])
        if not holders:
            return {}
        num_hashes = len(block_hashes)
        last_hash = block_hashes[-1]
        scores: dict[WorkerId, int] = {}
        for worker_id in holders:
            blocks = self._workers[worker_id]
            parents = blocks.parents
            if blocks.num_orphans:
                scores[worker_id] = len(list(takewhile(parents.__contains__, block_hashes)))
            elif last_hash in parents:
                scores[worker_id] = num_hashes
            else:  # prefix-closed: held blocks are a leading run; find its end
                lo, hi = 1, num_hashes - 1  # block_hashes[0] is held, block_hashes[-1] is not
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if block_hashes[mid] in parents:
                        lo = mid + 1
                    else:
                        hi = mid
                scores[worker_id] = lo
        return scores

    def find_tiered_matches(self, block_hashes: Sequence[BlockHash]) -> dict[WorkerId, TierMatch]:
        """`find_matches`, with each worker's leading blocks split by the best medium holding them.

        O(H log D) for workers whose every block is on the device, O(D) more
        for a worker holding blocks off the device. No side effects.
        """
        matches: dict[WorkerId, TierMatch] = {}
        for worker_id, num_blocks in self.find_matches(block_hashes).items():
            blocks = self._workers[worker_id]
            if not blocks.num_off_device:
                matches[worker_id] = TierMatch(num_blocks)
                continue
            media = blocks.media
            counts = [0, 0, 0]
            for block_hash in block_hashes[:num_blocks]:
                mask = media.get(block_hash, _DEVICE)
                counts[0 if mask & _DEVICE else 1 if mask & _HOST else 2] += 1
            matches[worker_id] = TierMatch(*counts)
        return matches

    def media_mask(self, worker_id: WorkerId, block_hash: BlockHash) -> int:
        """Media bits (`Medium.bit`) of a worker's block; 0 when it holds none. Raises UnknownWorkerError."""
        blocks = self._blocks(worker_id)
        if block_hash not in blocks.parents:
            return 0
        return blocks.media.get(block_hash, _DEVICE)

    def dump(self) -> dict[WorkerId, list[tuple[BlockHash, BlockHash | None]]]:
        """Every worker's (hash, parent) entries, least recently stored first; `replace_worker` takes them back."""
        return {worker_id: list(blocks.parents.items()) for worker_id, blocks in self._workers.items()}

    def dump_media(self) -> dict[WorkerId, list[tuple[BlockHash, int]]]:
        """Every worker's (hash, media mask) for its entries held anywhere but exactly the device."""
        return {worker_id: list(blocks.media.items()) for worker_id, blocks in self._workers.items()}

    def check_integrity(self) -> None:
        """Raise RuntimeError if child counts, orphan counts or root holders disagree with the entries."""
        roots: dict[BlockHash, set[WorkerId]] = {}
        for worker_id, blocks in self._workers.items():
            num_children: dict[BlockHash, int] = {}
            for block_hash, parent in blocks.parents.items():
                if parent is None:
                    roots.setdefault(block_hash, set()).add(worker_id)
                else:
                    num_children[parent] = num_children.get(parent, 0) + 1
            if num_children != blocks.num_children:
                raise RuntimeError(f"worker {worker_id}: child counts {blocks.num_children} != {num_children}")
            num_orphans = sum(1 for p in blocks.parents.values() if p is not None and p not in blocks.parents)
            if num_orphans != blocks.num_orphans:
                raise RuntimeError(f"worker {worker_id}: {blocks.num_orphans} orphans counted, {num_orphans} held")
            if len(blocks.parents) > self.max_blocks_per_worker:
                raise RuntimeError(f"worker {worker_id}: {len(blocks.parents)} entries over the cap")
            for block_hash, mask in blocks.media.items():
                if block_hash not in blocks.parents or not 0 < mask <= ALL_MEDIA_MASK or mask == _DEVICE:
                    raise RuntimeError(f"worker {worker_id}: media mask {mask} of block {block_hash} is invalid")
            num_off_device = sum(1 for mask in blocks.media.values() if not mask & _DEVICE)
            if num_off_device != blocks.num_off_device:
                raise RuntimeError(f"worker {worker_id}: {blocks.num_off_device} off-device blocks counted, {num_off_device} held")
        if roots != self._root_holders:
            raise RuntimeError("root holders disagree with the entries")

    # -- internals ---------------------------------------------------------------

    def _blocks(self, worker_id: WorkerId) -> _WorkerBlocks:
        try:
            return self._workers[worker_id]
        except KeyError:
            raise UnknownWorkerError(worker_id) from None

    def _store(
        self,
        worker_id: WorkerId,
        blocks: _WorkerBlocks,
        block_hashes: Sequence[BlockHash],
        parent_block_hash: BlockHash | None,
        bit: int,
    ) -> None:
        parents = blocks.parents
        num_children = blocks.num_children
        count_children = num_children.get
        num_orphans = blocks.num_orphans
        track_media = bit != _DEVICE or blocks.media  # device-only workers skip the media bookkeeping
        # Tail first, so a chain's head ends up most recently stored and the
        # cap drops tails before heads (no orphans from capping a fresh run).
        for i in range(len(block_hashes) - 1, -1, -1):
            block_hash = block_hashes[i]
            if block_hash in parents:
                parents[block_hash] = parents.pop(block_hash)  # most recently stored now
                if track_media:
                    old = blocks.media.get(block_hash, _DEVICE)
                    self._set_mask(blocks, block_hash, old, old | bit)
                continue
            if bit != _DEVICE:
                self._set_mask(blocks, block_hash, _DEVICE, bit)
            parent = block_hashes[i - 1] if i else parent_block_hash
            num_orphans -= count_children(block_hash, 0)  # its held children were orphans until now
            parents[block_hash] = parent
            if parent is None:
                holders = self._root_holders.get(block_hash)
                if holders is None:
                    self._root_holders[block_hash] = {worker_id}
                else:
                    holders.add(worker_id)
            else:
                num_children[parent] = count_children(parent, 0) + 1
                if parent not in parents:
                    num_orphans += 1
        blocks.num_orphans = num_orphans
        if len(parents) > self.max_blocks_per_worker:
            self._cap(worker_id, blocks)

    def _remove(
        self, worker_id: WorkerId, blocks: _WorkerBlocks, block_hashes: Iterable[BlockHash], bit: int = ALL_MEDIA_MASK
    ) -> None:
        """Drop the media in `bit` from the held ones of `block_hashes`; an entry left in no medium goes."""
        parents = blocks.parents
        num_children = blocks.num_children
        count_children = num_children.get
        num_orphans = blocks.num_orphans
        media = blocks.media
        for block_hash in block_hashes:
            if media and block_hash in media:
                old = media[block_hash]
                if old & ~bit:  # still held in another medium
                    self._set_mask(blocks, block_hash, old, old & ~bit)
                    continue
                self._set_mask(blocks, block_hash, old, _DEVICE)  # forget its media; the entry goes below
            elif not bit & _DEVICE:
                continue  # held on the device only, and the removal is not from the device
            parent = parents.pop(block_hash, _NOT_HELD)
            if parent is _NOT_HELD:
                continue
            if parent is None:
                self._discard_root(block_hash, worker_id)
            else:
                remaining = num_children[parent] - 1
                if remaining:
                    num_children[parent] = remaining
                else:
                    del num_children[parent]
                if parent not in parents and parent != block_hash:  # it was an orphan
                    num_orphans -= 1
            num_orphans += count_children(block_hash, 0)  # its held children are orphans now
        blocks.num_orphans = num_orphans

    def _cap(self, worker_id: WorkerId, blocks: _WorkerBlocks) -> None:
        # Down to 7/8 of the cap at once: dropping from the front of a dict is
        # cheap only in bulk (the iteration skips the holes earlier drops left).
        num_excess = len(blocks.parents) - (self.max_blocks_per_worker - self.max_blocks_per_worker // 8)
        if num_excess > 0:
            self._remove(worker_id, blocks, list(islice(blocks.parents, num_excess)))
            self.num_capped_blocks += num_excess

    @staticmethod
    def _set_mask(blocks: _WorkerBlocks, block_hash: BlockHash, old: int, new: int) -> None:
        """Change a held block's media mask from `old` to `new` (both non-zero)."""
        if old == new:
            return
        if new == _DEVICE:
            blocks.media.pop(block_hash, None)
        else:
            blocks.media[block_hash] = new
        blocks.num_off_device += (not new & _DEVICE) - (not old & _DEVICE)

    def _discard_root(self, block_hash: BlockHash, worker_id: WorkerId) -> None:
        holders = self._root_holders[block_hash]
        holders.discard(worker_id)
        if not holders:
            del self._root_holders[block_hash]
