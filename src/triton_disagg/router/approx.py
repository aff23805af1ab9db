"""Approximate prefix index for workers that publish no KV events.

The router records the blocks of each request it routes as cached on the
chosen worker, and forgets them `ttl_s` after they were last routed there
(the worker has probably evicted them by then). Same matching as the KV
index, same memory bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from triton_disagg.router.events import WorkerId
from triton_disagg.router.hashing import BlockHash
from triton_disagg.router.index import PrefixIndex


class ApproxIndex:
    """A PrefixIndex learnt from routing decisions, whose entries expire.

    Times are caller-supplied seconds on one monotonic clock. Complexity:
    `record` O(D), `find_matches` O(H log D) plus the entries it expires.
    Not thread-safe.
    """

    def __init__(self, ttl_s: float, max_blocks_per_worker: int):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self.index = PrefixIndex(max_blocks_per_worker)
        # Per worker: hash -> last routed at, oldest first (a request's head most recent).
        self._routed_at_s: dict[WorkerId, OrderedDict[BlockHash, float]] = {}

    def add_worker(self, worker_id: WorkerId) -> None:
        self.index.add_worker(worker_id)
        self._routed_at_s.setdefault(worker_id, OrderedDict())

    def remove_worker(self, worker_id: WorkerId) -> None:
        self.index.remove_worker(worker_id)
        self._routed_at_s.pop(worker_id, None)

    def record(self, worker_id: WorkerId, block_hashes: Sequence[BlockHash], now_s: float) -> None:
        """Assume `block_hashes` (a chain from the first block) cached on `worker_id` from `now_s`."""
        self.expire(now_s)
        self.index.store_blocks(worker_id, block_hashes)
        routed_at_s = self._routed_at_s[worker_id]
        for block_hash in reversed(block_hashes):
            routed_at_s[block_hash] = now_s
            routed_at_s.move_to_end(block_hash)
        while len(routed_at_s) > self.index.max_blocks_per_worker:
            routed_at_s.popitem(last=False)

    def find_matches(self, block_hashes: Sequence[BlockHash], now_s: float) -> dict[WorkerId, int]:
        """Leading blocks of `block_hashes` each worker is assumed to hold at `now_s` (expires first)."""
        self.expire(now_s)
        return self.index.find_matches(block_hashes)

    def expire(self, now_s: float) -> int:
        """Forget entries routed at or before `now_s - ttl_s`; returns how many."""
        cutoff_s = now_s - self.ttl_s
        num_expired = 0
        for worker_id, routed_at_s in self._routed_at_s.items():
            expired: list[BlockHash] = []
            while routed_at_s:
                block_hash, at_s = next(iter(routed_at_s.items()))
                if at_s > cutoff_s:
                    break
                del routed_at_s[block_hash]
                expired.append(block_hash)
            if expired:
                self.index.remove_blocks(worker_id, expired)
                num_expired += len(expired)
        return num_expired
