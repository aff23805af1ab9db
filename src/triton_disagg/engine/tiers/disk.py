"""The disk tier: one file per KV block in a folder of this worker's own, LRU over the blocks.

Bookkeeping only; the copier writes, reads and deletes the files. An entry
is *writing* until its file is complete and *ready* after; onboarding jobs
pin the entries they read. Only ready, unpinned entries are evicted, least
recently used first; the caller queues the eviction's file deletion ahead of
any later write, so a hash evicted and written again never races itself.

The folder is locked (`flock`) for the tier's lifetime: two workers sharing
one would evict each other's files. On start the tier adopts the valid
files a previous run left (header, layout and size checked; the payload's
checksum is checked when a block is read) and deletes the invalid ones.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from triton_disagg.engine.tiers.block_file import SUFFIX, BlockFileLayout, InvalidBlockFile, file_name, read_header
from triton_disagg.router.hashing import BlockHash

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


@dataclass(slots=True)
class DiskEntry:
    parent_hash: BlockHash | None
    is_ready: bool = False
    num_readers: int = 0  # onboarding jobs queued or running that read the file


class DiskTier:
    """At most `num_blocks` block files in `folder`. Engine thread only, except `path_of`."""

    def __init__(self, folder: Path, num_blocks: int, layout: BlockFileLayout):
        """Lock `folder` (created if missing) and adopt its valid block files.

        Raises ValueError when another process holds the folder, OSError when
        it cannot be created or read.
        """
        if num_blocks < 1:
            raise ValueError(f"the disk tier needs >= 1 block, got {num_blocks}")
        self.folder = Path(folder)
        self.num_blocks = num_blocks
        self.layout = layout
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ValueError(
                f"kv_disk_path {self.folder} is in use by another worker; give each worker a folder of its own"
            ) from None
        self._entries: OrderedDict[BlockHash, DiskEntry] = OrderedDict()  # least recently used first
        #: Files found invalid (and deleted) when the tier started.
        self.num_invalid_at_start = 0
        self._adopt_existing_files()

    @property
    def num_resident(self) -> int:
        return len(self._entries)

    def __contains__(self, block_hash: BlockHash) -> bool:
        return block_hash in self._entries

    def path_of(self, block_hash: BlockHash) -> Path:
        return self.folder / file_name(block_hash)

    def ready(self, block_hash: BlockHash) -> DiskEntry | None:
        entry = self._entries.get(block_hash)
        return entry if entry is not None and entry.is_ready else None

    def touch(self, block_hash: BlockHash) -> None:
        self._entries.move_to_end(block_hash)

    def reserve(self, block_hash: BlockHash, parent_hash: BlockHash | None) -> tuple[DiskEntry | None, list[BlockHash]]:
        """A writing entry for a new block, and the blocks evicted to make room (delete their files first).

        Returns (None, []) when every entry is writing or pinned. Raises if `block_hash` is already held.
        """
        if block_hash in self._entries:
            raise RuntimeError(f"block {block_hash:016x} is already in the disk tier")
        evicted: list[BlockHash] = []
        if len(self._entries) >= self.num_blocks:
            victim = next((h for h, e in self._entries.items() if e.is_ready and not e.num_readers), None)
            if victim is None:
                return None, []
            del self._entries[victim]
            evicted.append(victim)
        entry = DiskEntry(parent_hash)
        self._entries[block_hash] = entry
        return entry, evicted

    def mark_ready(self, block_hash: BlockHash) -> None:
        self._entries[block_hash].is_ready = True

    def forget(self, block_hash: BlockHash) -> None:
        """Drop an entry (its file is invalid or its write failed); the caller deletes the file."""
        del self._entries[block_hash]

    def entry(self, block_hash: BlockHash) -> DiskEntry | None:
        return self._entries.get(block_hash)

    def pin(self, block_hash: BlockHash) -> DiskEntry:
        """Keep a ready entry from eviction until its reader decrements `num_readers` again."""
        entry = self._entries[block_hash]
        entry.num_readers += 1
        return entry

    def entries(self) -> list[tuple[BlockHash, DiskEntry]]:
        """(hash, entry) pairs, least recently used first."""
        return list(self._entries.items())

    def drop_all(self) -> list[BlockHash]:
        """Forget every block (none may be writing or pinned); returns their hashes. Files are the caller's."""
        if any(not e.is_ready or e.num_readers for e in self._entries.values()):
            raise RuntimeError("the disk tier has I/O in flight; wait for it before dropping it")
        dropped = list(self._entries)
        self._entries.clear()
        return dropped

    def close(self) -> None:
        """Release the folder's lock (idempotent). The files stay for the next run."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def check_integrity(self, expect_idle: bool) -> None:
        """Raise if the tier is over capacity, or (with `expect_idle`) if its files and entries differ."""
        if len(self._entries) > self.num_blocks:
            raise RuntimeError(f"disk tier holds {len(self._entries)} blocks, over its {self.num_blocks}")
        if not expect_idle:
            return
        if any(not e.is_ready or e.num_readers for e in self._entries.values()):
            raise RuntimeError("disk tier: I/O is still in flight")
        on_disk = {path.name for path in self.folder.glob(f"*{SUFFIX}")}
        expected = {file_name(block_hash) for block_hash in self._entries}
        if on_disk != expected:
            raise RuntimeError(
                f"disk tier: {len(on_disk - expected)} files without an entry, {len(expected - on_disk)} entries without a file"
            )

    def _adopt_existing_files(self) -> None:
        found: list[tuple[int, BlockHash, BlockHash | None]] = []
        for path in self.folder.glob(f"*{SUFFIX}"):
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    header, _ = read_header(fd, self.layout)
                    mtime_ns = os.fstat(fd).st_mtime_ns
                finally:
                    os.close(fd)
                if path.name != file_name(header.block_hash):
                    raise InvalidBlockFile(f"named {path.name} but holds block {header.block_hash:016x}")
            except (InvalidBlockFile, OSError) as exc:
                logger.warning("dropping KV block file %s: %s", path, exc)
                path.unlink(missing_ok=True)
                self.num_invalid_at_start += 1
                continue
            found.append((mtime_ns, header.block_hash, header.parent_hash))
        found.sort()
        for _, block_hash, _ in found[: max(len(found) - self.num_blocks, 0)]:
            self.path_of(block_hash).unlink(missing_ok=True)  # over capacity: the oldest go
        for _, block_hash, parent_hash in found[-self.num_blocks :]:
            self._entries[block_hash] = DiskEntry(parent_hash, is_ready=True)
