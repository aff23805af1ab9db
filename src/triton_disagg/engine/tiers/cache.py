"""Lower KV tiers of one engine: host memory and disk under the device pool.

A cached block whose last holder lets go (`block_freed`) is queued for a
copy to host memory; at each `flush` the queued blocks go out as one
background job, while they wait in the device pool's eviction queue. So
eviction normally finds the copy done; if not, `before_reuse` waits for it
(the block's slot must not be rewritten under a copy). A block that is
freed and reused within one scheduling pass is not offloaded.

Host memory is inclusive (a block may be on the device and in host memory
at once) and LRU; a block evicted from it goes to disk when it was used at
least `disk_min_uses` times (so a block seen once never churns the disk),
else it is gone. Its bytes are copied aside (into a buffer of
`MAX_PENDING_DISK_BYTES`) before its slot is reused, and written by the
disk thread; a disk that falls further behind than the buffer holds gets
fewer blocks. Disk is LRU too.

`start_onboard` brings blocks back into device blocks a request holds, as
an urgent job; `poll` hands back finished onboardings with how many of
their leading blocks arrived intact (a corrupt, truncated or foreign disk
file ends the run there: the file is dropped and the rest is recomputed).

Every change of what a tier holds is a KV event with its medium: stored
once a copy completed, removed when evicted or dropped. Everything here
runs on the engine thread except the copier's jobs.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from triton_disagg.engine.tiers.accounting import TierStats, UseCounter
from triton_disagg.engine.tiers.block_file import BlockFileHeader, BlockFileLayout
from triton_disagg.engine.tiers.copier import (
    BlockMover,
    CopyBlocks,
    CopyJob,
    DeleteFile,
    Lane,
    ReadFile,
    TierCopier,
    TorchMover,
    WriteFile,
)
from triton_disagg.engine.tiers.disk import DiskEntry, DiskTier
from triton_disagg.engine.tiers.host import HostEntry, HostTier
from triton_disagg.router.events import BlockRemoved, BlockStored, KVEvent, Medium
from triton_disagg.router.hashing import BlockHash

logger = logging.getLogger(__name__)

HOST, DISK = Medium.HOST, Medium.DISK
#: Bytes of blocks copied aside for the disk thread and not yet written; beyond, host evictions skip the disk.
MAX_PENDING_DISK_BYTES = 256 * 2**20


@dataclass(slots=True, eq=False)
class OnboardTicket:
    """One request's blocks coming back from lower tiers."""

    request_id: str
    block_hashes: list[BlockHash]  # in prefix order
    media: list[Medium]  # where each comes from: HOST or DISK
    block_ids: list[int]  # the device blocks they go to
    #: Once done: how many leading blocks arrived intact.
    num_ready: int = 0
    is_done: bool = False
    #: The tier entries read, pinned until the job ends (one per block, in order).
    pinned: list[HostEntry | DiskEntry] = field(default_factory=list)

    def num_ready_from(self, medium: Medium) -> int:
        return sum(1 for m in self.media[: self.num_ready] if m is medium)


@dataclass(slots=True)
class _OffloadContext:
    """A background job: blocks leaving host memory for disk copied aside, then freed device blocks copied in."""

    block_ids: list[int] = field(default_factory=list)  # device blocks copied to host memory ...
    host_hashes: list[BlockHash] = field(default_factory=list)  # ... as these blocks
    to_host: CopyBlocks | None = None
    #: Evicted blocks for disk: copied from their host slots into aside slots, written by the followup.
    disk_hashes: list[BlockHash] = field(default_factory=list)
    host_slots: list[int] = field(default_factory=list)
    aside_slots: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _DiskContext:
    """A disk job: deletions, then one WriteFile per hash of `written`, in order."""

    written: list[BlockHash] = field(default_factory=list)


class TieredKVCache:
    """Host (and optionally disk) tiers under a device KV pool `(N, L, 2, BS, KVH, D)`."""

    def __init__(
        self,
        device_pool: torch.Tensor,
        host_blocks: int,
        layout: BlockFileLayout,
        disk_folder: Path | None = None,
        disk_blocks: int = 0,
        disk_min_uses: int = 2,
        mover: BlockMover | None = None,
    ):
        """Raises ValueError for a bad size or a disk folder another worker holds."""
        if disk_min_uses < 1:
            raise ValueError(f"kv_disk_min_uses must be >= 1, got {disk_min_uses}")
        self.device_pool = device_pool
        self.block_size = device_pool.shape[3]
        self.block_bytes = layout.block_bytes
        self.layout = layout
        self.host = HostTier(host_blocks, tuple(device_pool.shape[1:]), device_pool.dtype, device_pool.is_cuda)
        self.disk = DiskTier(disk_folder, disk_blocks, layout) if disk_folder is not None and disk_blocks > 0 else None
        self.disk_min_uses = disk_min_uses
        self.stats = TierStats()
        self.uses = UseCounter(2 * (device_pool.shape[0] + host_blocks + disk_blocks))
        self.copier = TierCopier(mover or TorchMover(device_pool.device), layout)
        self.copier.mover.register_pool(self.host.pool)
        # Blocks on their way to disk (empty: pages are committed as used).
        num_aside = max(MAX_PENDING_DISK_BYTES // self.block_bytes, 1) if self.disk is not None else 0
        self._aside = torch.empty((num_aside, *device_pool.shape[1:]), dtype=device_pool.dtype)
        self._free_aside = list(range(num_aside - 1, -1, -1))
        if num_aside:
            self.copier.mover.register_pool(self._aside)
        self._unsubmitted: dict[int, tuple[BlockHash, BlockHash | None]] = {}  # device block -> freed block
        self._reading_device: dict[int, CopyJob] = {}  # device block -> the offload copying it
        self._finished_onboards: list[OnboardTicket] = []
        self._events: list[KVEvent] = []
        if self.disk is not None:
            self.stats.invalid_blocks += self.disk.num_invalid_at_start
            for block_hash, entry in self.disk.entries():  # announce what a previous run left
                self._emit_stored([(block_hash, entry.parent_hash)], DISK)

    @property
    def has_completions(self) -> bool:
        """Whether finished copies wait for `poll` (cheap; any thread)."""
        return not self.copier.completed.empty() or bool(self._finished_onboards)

    # -- offload (BlockOffloader) ------------------------------------------------------------

    def block_freed(self, block_id: int, block_hash: BlockHash, parent_hash: BlockHash | None) -> None:
        self.uses.record(block_hash)
        if block_hash in self.host:
            self.host.touch(block_hash)
        else:
            self._unsubmitted[block_id] = (block_hash, parent_hash)

    def before_reuse(self, block_id: int) -> None:
        self._unsubmitted.pop(block_id, None)
        job = self._reading_device.get(block_id)
        if job is not None:
            started_s = time.perf_counter()
            job.done.wait()
            self.stats.offload_waits += 1
            self.stats.offload_wait_seconds += time.perf_counter() - started_s
            self._process_completed()

    def flush(self) -> None:
        """Submit the offloads of the blocks freed since the last flush, as one background job."""
        if not self._unsubmitted:
            return
        started_s = time.perf_counter()
        freed, self._unsubmitted = self._unsubmitted, {}
        context = _OffloadContext()
        disk_job = CopyJob([], Lane.DISK, context=_DiskContext())
        slots: list[int] = []
        # A sequence frees its blocks tail first: reversed, each sequence's blocks are in prefix
        # order, so consecutive ids make long copies and chains make few events.
        for block_id, (block_hash, parent_hash) in reversed(freed.items()):
            if block_hash in self.host:
                continue
            entry, evicted = self.host.reserve(block_hash, parent_hash)
            for evicted_hash, evicted_entry in evicted:
                self._evict_from_host(evicted_hash, evicted_entry, context, disk_job)
            if entry is None:
                self.stats.skipped_offloads += 1
                continue
            context.block_ids.append(block_id)
            context.host_hashes.append(block_hash)
            slots.append(entry.slot)
        ops: list = []
        if context.host_slots:  # set aside before the copies below reuse those slots
            ops.append(CopyBlocks(self.host.pool, context.host_slots, self._aside, context.aside_slots))
        if slots:
            context.to_host = CopyBlocks(self.device_pool, context.block_ids, self.host.pool, slots)
            ops.append(context.to_host)
        if ops or disk_job.ops:
            job = CopyJob(ops, Lane.BACKGROUND, context, self._device_ready_event(), followup=disk_job if disk_job.ops else None)
            for block_id in context.block_ids:
                self._reading_device[block_id] = job
            self.copier.submit(job)
        self.stats.bookkeeping_seconds += time.perf_counter() - started_s

    def _evict_from_host(self, block_hash: BlockHash, entry: HostEntry, context: _OffloadContext, disk_job: CopyJob) -> None:
        """Announce a block's eviction from host memory; queue it for disk if admitted (and the disk keeps up)."""
        self._events.append(BlockRemoved((block_hash,), HOST))
        self.stats.evicted_blocks["host"] += 1
        if self.disk is None:
            return
        if block_hash in self.disk:
            self.disk.touch(block_hash)
            return
        if self.uses.count(block_hash) < self.disk_min_uses:
            self.stats.not_admitted_blocks += 1
            return
        if not self._free_aside:
            self.stats.skipped_disk_writes += 1
            return
        disk_entry, evicted = self.disk.reserve(block_hash, entry.parent_hash)
        for evicted_hash in evicted:
            self._events.append(BlockRemoved((evicted_hash,), DISK))
            self.stats.evicted_blocks["disk"] += 1
            disk_job.ops.insert(0, DeleteFile(self.disk.path_of(evicted_hash)))  # deletions before writes
        if disk_entry is not None:
            aside_slot = self._free_aside.pop()
            header = BlockFileHeader(block_hash, entry.parent_hash)
            disk_job.ops.append(WriteFile(self._aside, aside_slot, self.disk.path_of(block_hash), header))
            disk_job.context.written.append(block_hash)
            context.disk_hashes.append(block_hash)
            context.host_slots.append(entry.slot)
            context.aside_slots.append(aside_slot)

    # -- onboard ---------------------------------------------------------------------------

    def find(self, block_hash: BlockHash) -> Medium | None:
        """The lower tier a block can be brought back from (host first), or None. No side effects."""
        if self.host.ready(block_hash) is not None:
            return HOST
        if self.disk is not None and self.disk.ready(block_hash) is not None:
            return DISK
        return None

    def start_onboard(
        self, request_id: str, block_hashes: list[BlockHash], media: list[Medium], block_ids: list[int]
    ) -> OnboardTicket:
        """Copy blocks (each where `find` said) into device blocks the request holds, as an urgent job.

        The entries read are pinned until the job ends; `poll` returns the ticket once it did.
        """
        started_s = time.perf_counter()
        ticket = OnboardTicket(request_id, block_hashes, media, block_ids)
        host_ids: list[int] = []
        host_slots: list[int] = []
        reads: list[ReadFile] = []
        for block_hash, medium, block_id in zip(block_hashes, media, block_ids):
            if medium is HOST:
                self.host.touch(block_hash)
                ticket.pinned.append(self.host.pin(block_hash))
                host_slots.append(ticket.pinned[-1].slot)
                host_ids.append(block_id)
            else:
                self.disk.touch(block_hash)
                ticket.pinned.append(self.disk.pin(block_hash))
                reads.append(ReadFile(self.disk.path_of(block_hash), block_hash, self.device_pool, block_id))
        ops: list = [CopyBlocks(self.host.pool, host_slots, self.device_pool, host_ids)] if host_ids else []
        self.copier.submit(CopyJob([*ops, *reads], Lane.URGENT, context=ticket))
        self.stats.bookkeeping_seconds += time.perf_counter() - started_s
        return ticket

    def poll(self) -> list[OnboardTicket]:
        """Apply finished jobs (events, stats, unpinning); return the onboardings that ended since the last call."""
        self._process_completed()
        finished, self._finished_onboards = self._finished_onboards, []
        return finished

    # -- events, lifecycle -------------------------------------------------------------------

    def drain_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def wait_idle(self, timeout_s: float | None = 30.0) -> None:
        """Submit pending offloads, wait for every job, apply them (and the jobs applying them adds).

        Raises TimeoutError.
        """
        self.flush()
        while True:
            if not self.copier.wait_idle(timeout_s):
                raise TimeoutError(f"KV tier copies still running after {timeout_s} s")
            self._process_completed()
            if not self.copier.num_unfinished:
                return

    def clear(self) -> None:
        """Drop every block of both tiers (files deleted); the caller announces it (AllCleared)."""
        self.wait_idle()
        self.host.drop_all()
        if self.disk is not None:
            for block_hash in self.disk.drop_all():
                self.disk.path_of(block_hash).unlink(missing_ok=True)
        self._events.clear()

    def close(self) -> None:
        """Finish queued copies and stop the copier; release the disk folder. Idempotent."""
        self.copier.close()
        if self.disk is not None:
            self.disk.close()

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Raise if a tier's accounting is off; with `expect_idle` (after `wait_idle`), also if anything is in flight."""
        self.host.check_integrity(expect_idle)
        if self.disk is not None:
            self.disk.check_integrity(expect_idle)
        if expect_idle and (self._reading_device or self._unsubmitted or self.copier.num_unfinished):
            raise RuntimeError("KV tier copies are still pending")
        if expect_idle and len(self._free_aside) != len(self._aside):
            raise RuntimeError(f"{len(self._aside) - len(self._free_aside)} blocks set aside for disk were never written")

    # -- completions ---------------------------------------------------------------------------

    def _process_completed(self) -> None:
        if self.copier.completed.empty():
            return
        started_s = time.perf_counter()
        while True:
            try:
                job = self.copier.completed.get_nowait()
            except queue.Empty:
                break
            if job.lane is Lane.URGENT:
                self._complete_onboard(job)
            elif job.lane is Lane.BACKGROUND:
                self._complete_offload(job)
            else:
                self._complete_disk_job(job)
        self.stats.bookkeeping_seconds += time.perf_counter() - started_s

    def _complete_offload(self, job: CopyJob) -> None:
        context: _OffloadContext = job.context
        if job.followup_dropped:  # the blocks for disk were not copied aside: no file is written
            for block_hash in context.disk_hashes:
                self.disk.forget(block_hash)
            self._free_aside.extend(context.aside_slots)
            for op in job.followup.ops:
                if type(op) is DeleteFile:  # the disk evictions still go
                    self._delete_file(op.path)
        op = context.to_host
        if op is None:
            return
        stored_in_host = []
        for block_id, block_hash in zip(context.block_ids, context.host_hashes):
            if self._reading_device.get(block_id) is job:
                del self._reading_device[block_id]
            if op.ok:
                self.host.mark_ready(block_hash)
                stored_in_host.append((block_hash, self.host.ready(block_hash).parent_hash))
            else:
                self.host.forget(block_hash)
        if stored_in_host:
            self._emit_stored(stored_in_host, HOST)
            self.stats.offloaded_blocks["host"] += len(stored_in_host)
            self._count_move("host", self.stats.bytes_in, self.stats.seconds_in, len(stored_in_host), op.elapsed_s)

    def _complete_disk_job(self, job: CopyJob) -> None:
        written = iter(job.context.written)
        stored_on_disk: list[tuple[BlockHash, BlockHash | None]] = []
        for op in job.ops:
            if type(op) is not WriteFile:
                continue
            block_hash = next(written)
            self._free_aside.append(op.slot)
            if op.ok:
                self.disk.mark_ready(block_hash)
                stored_on_disk.append((block_hash, op.header.parent_hash))
                self._count_move("disk", self.stats.bytes_in, self.stats.seconds_in, 1, op.elapsed_s)
                self.stats.offloaded_blocks["disk"] += 1
            else:
                self.disk.forget(block_hash)
                self._delete_file(op.path)
        if stored_on_disk:
            self._emit_stored(stored_on_disk, DISK)

    def _delete_file(self, path: Path) -> None:
        self.copier.submit(CopyJob([DeleteFile(path)], Lane.DISK, context=_DiskContext()))

    def _complete_onboard(self, job: CopyJob) -> None:
        ticket: OnboardTicket = job.context
        for entry in ticket.pinned:
            entry.num_readers -= 1
        pinned_disk = {h: e for h, m, e in zip(ticket.block_hashes, ticket.media, ticket.pinned) if m is DISK}
        failed: set[BlockHash] = set()
        for op in job.ops:
            if type(op) is CopyBlocks:
                if op.ok:
                    self._count_move("host", self.stats.bytes_out, self.stats.seconds_out, len(op.src_ids), op.elapsed_s)
                else:
                    failed.update(h for h, m in zip(ticket.block_hashes, ticket.media) if m is HOST)
            elif type(op) is ReadFile:
                if op.ok:
                    self._count_move("disk", self.stats.bytes_out, self.stats.seconds_out, 1, op.elapsed_s)
                else:
                    failed.add(op.block_hash)
                    self._drop_disk_block(op.block_hash, pinned_disk[op.block_hash], op.error)
        ticket.num_ready = next((i for i, h in enumerate(ticket.block_hashes) if h in failed), len(ticket.block_hashes))
        ticket.is_done = True
        self.stats.onboarded_blocks["host"] += ticket.num_ready_from(HOST)
        self.stats.onboarded_blocks["disk"] += ticket.num_ready_from(DISK)
        self._finished_onboards.append(ticket)

    def _drop_disk_block(self, block_hash: BlockHash, entry: DiskEntry, reason: str) -> None:
        """Forget a block whose file failed to read (unless another reader dropped it already) and delete the file."""
        logger.warning("dropping KV block file of %016x (%s); the block will be recomputed", block_hash, reason)
        if self.disk.entry(block_hash) is entry:
            self.disk.forget(block_hash)
            self._events.append(BlockRemoved((block_hash,), DISK))
            self.stats.invalid_blocks += 1
            self._delete_file(self.disk.path_of(block_hash))

    def _count_move(self, tier: str, bytes_by_tier: dict, seconds_by_tier: dict, num_blocks: int, elapsed_s: float) -> None:
        bytes_by_tier[tier] += num_blocks * self.block_bytes
        seconds_by_tier[tier] += elapsed_s

    def _emit_stored(self, blocks: list[tuple[BlockHash, BlockHash | None]], medium: Medium) -> None:
        """BlockStored events for (hash, parent) pairs, one per run where each block's parent is the one before."""
        run: list[BlockHash] = []
        parent_of_run: BlockHash | None = None
        for block_hash, parent_hash in blocks:
            if run and parent_hash == run[-1]:
                run.append(block_hash)
                continue
            if run:
                self._events.append(BlockStored(tuple(run), parent_of_run, (), self.block_size, medium))
            run, parent_of_run = [block_hash], parent_hash
        if run:
            self._events.append(BlockStored(tuple(run), parent_of_run, (), self.block_size, medium))

    def _device_ready_event(self) -> object:
        if not self.device_pool.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()  # on the engine thread's stream: the offload waits for the step that wrote the blocks
        return event
