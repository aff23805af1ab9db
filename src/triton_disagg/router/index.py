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

The index is not thread-safe: one thread mutates it, or callers hold a lock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice, takewhile

from triton_disagg.router.events import AllCleared, BlockRemoved, BlockStored, KVEvent, WorkerId
from triton_disagg.router.hashing import BlockHash

#: Default for `max_blocks_per_worker`: 262,144 blocks (about 4M tokens at a
#: 16-token block), some 40 MB of index per worker.
DEFAULT_MAX_BLOCKS_PER_WORKER = 1 << 18

_NOT_HELD = object()


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
            self._store(worker_id, blocks, event.block_hashes, event.parent_block_hash)
        elif type(event) is BlockRemoved:
            self._remove(worker_id, blocks, event.block_hashes)
        elif type(event) is AllCleared:
            self.clear_worker(worker_id)
        else:
            raise TypeError(f"not a KV event: {type(event).__name__}")

    def store_blocks(
        self, worker_id: WorkerId, block_hashes: Sequence[BlockHash], parent_block_hash: BlockHash | None = None
    ) -> None:
        """Same as applying BlockStored(block_hashes, parent_block_hash, ...), without building the event."""
        self._store(worker_id, self._blocks(worker_id), block_hashes, parent_block_hash)

    def remove_blocks(self, worker_id: WorkerId, block_hashes: Iterable[BlockHash]) -> None:
        """Same as applying BlockRemoved(block_hashes)."""
        self._remove(worker_id, self._blocks(worker_id), block_hashes)

    def replace_worker(self, worker_id: WorkerId, entries: Iterable[tuple[BlockHash, BlockHash | None]]) -> None:
        """Set a known worker's blocks to `entries` ((hash, parent) pairs, least recent first), as after a dump."""
        self.clear_worker(worker_id)
        blocks = self._workers[worker_id]
        for block_hash, parent in entries:
            self._store(worker_id, blocks, (block_hash,), parent)

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

    def dump(self) -> dict[WorkerId, list[tuple[BlockHash, BlockHash | None]]]:
        """Every worker's (hash, parent) entries, least recently stored first; `replace_worker` takes them back."""
        return {worker_id: list(blocks.parents.items()) for worker_id, blocks in self._workers.items()}

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
    ) -> None:
        parents = blocks.parents
        num_children = blocks.num_children
        count_children = num_children.get
        num_orphans = blocks.num_orphans
        # Tail first, so a chain's head ends up most recently stored and the
        # cap drops tails before heads (no orphans from capping a fresh run).
        for i in range(len(block_hashes) - 1, -1, -1):
            block_hash = block_hashes[i]
            if block_hash in parents:
                parents[block_hash] = parents.pop(block_hash)  # most recently stored now
                continue
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

    def _remove(self, worker_id: WorkerId, blocks: _WorkerBlocks, block_hashes: Iterable[BlockHash]) -> None:
        """Remove the held ones of `block_hashes`; the others are ignored."""
        parents = blocks.parents
        num_children = blocks.num_children
        count_children = num_children.get
        num_orphans = blocks.num_orphans
        for block_hash in block_hashes:
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

    def _discard_root(self, block_hash: BlockHash, worker_id: WorkerId) -> None:
        holders = self._root_holders[block_hash]
        holders.discard(worker_id)
        if not holders:
            del self._root_holders[block_hash]
