"""The host-memory tier: a pool of block slots in host memory, LRU over the blocks they hold.

Bookkeeping only; the copier moves the bytes. An entry is *filling* while
its copy from the device pool is in flight (nothing reads it yet) and
*ready* after. Onboarding jobs pin the entries they read, so those are never
evicted under them; only ready, unpinned entries are evicted, least recently
used first. A slot freed by an eviction is reusable at once by background
copies: the copier runs those in submission order, so whatever still reads
the slot (the evicted block's write to disk) runs before what overwrites it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from triton_disagg.router.hashing import BlockHash


@dataclass(slots=True)
class HostEntry:
    slot: int
    parent_hash: BlockHash | None
    is_ready: bool = False
    num_readers: int = 0  # onboarding jobs queued or running that read the slot


class HostTier:
    """`num_blocks` slots of one block each in `pool` (pinned on CUDA machines). Engine thread only."""

    def __init__(self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin_memory: bool):
        if num_blocks < 1:
            raise ValueError(f"the host tier needs >= 1 block, got {num_blocks}")
        self.num_blocks = num_blocks
        # Empty, not zeros: pages are committed as blocks arrive, and a slot is read only once written.
        self.pool = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin_memory)  # (N, L, 2, BS, KVH, D)
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self._entries: OrderedDict[BlockHash, HostEntry] = OrderedDict()  # least recently used first

    @property
    def num_resident(self) -> int:
        """Blocks held (filling or ready)."""
        return len(self._entries)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._entries

    def ready(self, block_hash: BlockHash) -> HostEntry | None:
        """The entry of `block_hash` if its bytes are in host memory; no side effects."""
        entry = self._entries.get(block_hash)
        return entry if entry is not None and entry.is_ready else None

    def touch(self, block_hash: BlockHash) -> None:
        """Mark a held block most recently used."""
        self._entries.move_to_end(block_hash)

    def reserve(self, block_hash: BlockHash, parent_hash: BlockHash | None) -> tuple[HostEntry | None, list[tuple[BlockHash, HostEntry]]]:
        """A filling entry for a new block, and the entries evicted to make room (least recent first).

        Returns (None, []) when every slot is filling or pinned: the block is
        then not offloaded. Raises if `block_hash` is already held.
        """
        if block_hash in self._entries:
            raise RuntimeError(f"block {block_hash:016x} is already in the host tier")
        evicted: list[tuple[BlockHash, HostEntry]] = []
        if not self._free_slots:
            victim = next((h for h, e in self._entries.items() if e.is_ready and not e.num_readers), None)
            if victim is None:
                return None, []
            entry = self._entries.pop(victim)
            evicted.append((victim, entry))
            self._free_slots.append(entry.slot)
        entry = HostEntry(self._free_slots.pop(), parent_hash)
        self._entries[block_hash] = entry
        return entry, evicted

    def mark_ready(self, block_hash: BlockHash) -> None:
        self._entries[block_hash].is_ready = True

    def pin(self, block_hash: BlockHash) -> HostEntry:
        """Keep a ready entry from eviction until its reader decrements `num_readers` again."""
        entry = self._entries[block_hash]
        entry.num_readers += 1
        return entry

    def forget(self, block_hash: BlockHash) -> None:
        """Drop a filling entry whose copy failed; its slot is free again."""
        self._free_slots.append(self._entries.pop(block_hash).slot)

    def drop_all(self) -> list[BlockHash]:
        """Forget every block (none may be filling or pinned); returns their hashes."""
        if any(not e.is_ready or e.num_readers for e in self._entries.values()):
            raise RuntimeError("the host tier has copies in flight; wait for them before dropping it")
        dropped = list(self._entries)
        self._free_slots = list(range(self.num_blocks - 1, -1, -1))
        self._entries.clear()
        return dropped

    def entries(self) -> list[tuple[BlockHash, HostEntry]]:
        """(hash, entry) pairs, least recently used first."""
        return list(self._entries.items())

    def check_integrity(self, expect_idle: bool) -> None:
        """Raise if slots leak or are shared; with `expect_idle`, also if any copy is in flight."""
        slots = [entry.slot for entry in self._entries.values()]
        if len(set(slots)) != len(slots) or set(slots) & set(self._free_slots):
            raise RuntimeError("a host slot is held by two blocks, or held and free")
        if len(slots) + len(self._free_slots) != self.num_blocks:
            raise RuntimeError(f"host tier: {len(slots)} held + {len(self._free_slots)} free != {self.num_blocks} slots")
        if expect_idle and any(not e.is_ready or e.num_readers for e in self._entries.values()):
            raise RuntimeError("host tier: a copy is still in flight")
