"""KV block allocator with reference counts, prefix caching and LRU eviction.

Every block is either held (ref_count > 0) or in the free queue. A free block
may still be a cached prefix block (it has a hash): it is reused on a hit, and
only evicted when the allocator needs a block and it is the least recently
freed one. Freed blocks that hold no cached prefix go to the front of the
queue, so they are reused before any cached block is evicted.

With lower KV tiers, a `BlockOffloader` hears of every cached block that
becomes evictable (to copy it to host memory while it waits in the queue)
and of every block about to be rewritten (to finish a copy still reading it).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from triton_disagg.engine.sequence import Sequence
from triton_disagg.router.events import AllCleared, BlockRemoved, BlockStored, KVEvent
from triton_disagg.router.hashing import BlockHash


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None  # set while the block is in the prefix cache
    parent_hash: BlockHash | None = None  # hash of the block before it in its sequence, while cached


class BlockOffloader(Protocol):
    """Copies evictable cached blocks to a lower tier. Called on the engine thread."""

    def block_freed(self, block_id: int, block_hash: BlockHash, parent_hash: BlockHash | None) -> None:
        """A cached block's last holder let go: it may be evicted from now on (its contents never change)."""

    def before_reuse(self, block_id: int) -> None:
        """The block is about to be handed out and rewritten: return only once nothing reads it any more."""


class BlockManager:
    """Hands out KV blocks to sequences. Not thread-safe: the engine thread owns it."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        offloader: BlockOffloader | None = None,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Keys in eviction order: the first is reused (and evicted, if cached) first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self._events: list[KVEvent] = []
        self.offloader = offloader
        #: Monotonic counters: prompt blocks looked up in the prefix cache, found on the device, and
        #: cached blocks evicted from the device to make room.
        self.num_lookup_blocks = 0
        self.num_hit_blocks = 0
        self.num_evicted_blocks = 0

    # -- queries ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached or not."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running sequences (0..1)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_block_id(self, block_hash: BlockHash) -> int | None:
        """The block caching `block_hash`, or None (no side effects)."""
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def cached_block_ids(self, block_hashes: list[BlockHash]) -> list[int]:
        """Blocks holding the longest cached prefix of `block_hashes` (no side effects)."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    # -- allocation --------------------------------------------------------------

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for its next `num_new_tokens` tokens.

        On a sequence's first call, it first takes the longest cached prefix of
        tokens (at least one token is always left to compute, so the
        step yields logits) and sets `num_computed_tokens`/`num_cached_tokens`;
        `num_new_tokens` then counts from there and is clipped to what is left.
        Returns False, changing nothing, when too few blocks are free.
        """
        hits: list[int] = []
        is_first = not seq.block_ids and seq.num_computed_tokens == 0
        if is_first:
            max_hit_blocks = (seq.num_tokens - 1) // self.block_size
            hits = self.cached_block_ids(seq.hashes_up_to(max_hit_blocks))
            num_new_tokens = min(num_new_tokens, seq.num_tokens - len(hits) * self.block_size)
        num_computed = seq.num_computed_tokens + len(hits) * self.block_size
        if not self._take_blocks(seq, hits, num_computed + num_new_tokens):
            return False
        if is_first:
            self._count_lookup(seq, len(hits))
        if hits:
            seq.num_computed_tokens = seq.num_cached_tokens = num_computed
        return True

    def allocate_prefix(self, seq: Sequence, hit_block_ids: list[int], num_tokens: int) -> bool:
        """Give a sequence without blocks the cached `hit_block_ids` as its leading blocks, and new
        blocks up to `num_tokens` tokens.

        For onboarding: the caller fills the new blocks that follow the hits
        from a lower tier, then advances `num_computed_tokens` and commits.
        Returns False, changing nothing, when too few blocks are free.
        """
        if seq.block_ids:
            raise RuntimeError(f"allocate_prefix on {seq.request_id}, which already holds blocks {seq.block_ids}")
        if not self._take_blocks(seq, hit_block_ids, num_tokens):
            return False
        self._count_lookup(seq, len(hit_block_ids))
        return True

    def commit(self, seq: Sequence) -> None:
        """Offer `seq`'s newly completed full blocks to the prefix cache (emits BlockStored)."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_committed_blocks:
            return
        hashes = seq.hashes_up_to(num_full)
        run: list[int] = []  # block indices of the current run of newly cached blocks
        for idx in range(seq.num_committed_blocks, num_full):
            block = self.blocks[seq.block_ids[idx]]
            if block.block_hash is None and hashes[idx] not in self._cached:
                block.block_hash = hashes[idx]
                block.parent_hash = hashes[idx - 1] if idx else None
                self._cached[hashes[idx]] = block.block_id
                run.append(idx)
            else:  # already cached (here or in another block): the run breaks
                self._emit_stored(seq, run)
                run = []
        self._emit_stored(seq, run)
        seq.num_committed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s hold on its blocks; tail blocks become evictable before head blocks."""
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than taken (seq {seq.request_id})")
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)
                elif self.offloader is not None:
                    self.offloader.block_freed(block_id, block.block_hash, block.parent_hash)
        seq.block_ids = []
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (emits AllCleared). Refused (False) while any block is held.

        Clears the device pool only: with lower tiers, reset through the engine.
        """
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(AllCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def check_integrity(self) -> None:
        """Raise if the free queue, reference counts and cache map disagree. For tests and idle checks."""
        for block in self.blocks:
            if (block.ref_count == 0) != (block.block_id in self._free):
                raise RuntimeError(f"block {block.block_id}: ref_count {block.ref_count} but free={block.block_id in self._free}")
            if block.block_hash is not None and self._cached.get(block.block_hash) != block.block_id:
                raise RuntimeError(f"block {block.block_id} has a hash the cache map does not point back to")
        if len(self._cached) != sum(block.block_hash is not None for block in self.blocks):
            raise RuntimeError("cache map holds hashes of no block")

    # -- internals ---------------------------------------------------------------

    def _count_lookup(self, seq: Sequence, num_hits: int) -> None:
        self.num_lookup_blocks += (seq.num_tokens - 1) // self.block_size
        self.num_hit_blocks += num_hits

    def _take_blocks(self, seq: Sequence, hits: list[int], num_tokens: int) -> bool:
        """Append the cached `hits` and new blocks up to `num_tokens` to `seq`'s blocks, or change nothing."""
        num_needed = self.num_blocks_for(num_tokens) - len(seq.block_ids) - len(hits)
        num_hits_free = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        if num_needed > self.num_free_blocks - num_hits_free:
            return False
        for block_id in hits:
            self._take(block_id)
        seq.block_ids.extend(hits)
        if hits:
            seq.num_committed_blocks = len(seq.block_ids)
        for _ in range(max(num_needed, 0)):
            seq.block_ids.append(self._take_oldest_free())
        return True

    def _take_oldest_free(self) -> int:
        """Take the first block of the free queue, evicting its cached prefix if it has one."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self.offloader is not None:
            self.offloader.before_reuse(block_id)
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            self._events.append(BlockRemoved((block.block_hash,)))
            self.num_evicted_blocks += 1
            block.block_hash = block.parent_hash = None
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _emit_stored(self, seq: Sequence, block_indices: list[int]) -> None:
        if not block_indices:
            return
        first, last = block_indices[0], block_indices[-1]
        self._events.append(
            BlockStored(
                block_hashes=tuple(seq.block_hashes[first : last + 1]),
                parent_block_hash=seq.block_hashes[first - 1] if first else None,
                token_ids=tuple(seq.token_ids[first * self.block_size : (last + 1) * self.block_size]),
                block_size=self.block_size,
            )
        )
