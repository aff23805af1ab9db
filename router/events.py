"""KV cache events a worker publishes so routers can index what it holds.

Shapes follow vLLM's KV events (and Dynamo's indexer input): a stored event
names a run of consecutive blocks by hash, with the parent of the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from router.hashing import BlockHash


@dataclass(slots=True, frozen=True)
class BlockStored:
    """Blocks that became reusable prefix cache, in prefix order.

    `parent_block_hash` is the hash of the block before `block_hashes[0]`
    (None when the run starts at the sequence's first block).
    """

    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(slots=True, frozen=True)
class BlockRemoved:
    """Blocks evicted from the cache; their hashes no longer resolve on this worker."""

    block_hashes: tuple[BlockHash, ...]


@dataclass(slots=True, frozen=True)
class AllCleared:
    """The worker dropped its whole prefix cache (reset or reload)."""


KVEvent = BlockStored | BlockRemoved | AllCleared
