"""The tiers' copy thread: moves KV blocks between the device pool, host memory and disk.

The engine thread decides (which block goes where) and submits `CopyJob`s;
background threads run them, so no copy or file I/O sits on the step's
critical path. Three lanes: on the memory thread, *urgent* jobs (onboarding:
a request waits on them) run before *background* ones (offloads to host
memory), between jobs; the *disk* thread writes and deletes block files.
Each lane runs its jobs strictly in submission order, which is what lets the
engine reuse a host slot or a file name at once: whatever still reads the
old contents was submitted, so runs, first. A block leaving host memory for
disk is first copied aside in the background job that reuses its slot, and
that job's `followup` (the file write) goes to the disk lane once it ran: a
slow disk never delays an offload, so never the eviction that waits on one.
Urgent jobs only read pinned entries and write blocks their own request
holds, so they never meet another job's bytes.

The bytes move through a `BlockMover`: `TorchMover` by default (a plain
`memmove` between host pools, CUDA copies on a side stream, positional
file I/O), or `NixlMover` (kv_tier_transport="nixl"). The file reads of an
onboarding job run `READ_THREADS` at a time: a disk serves several reads in
flight faster than one after another.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from triton_disagg.engine.tiers.block_file import (
    BlockFileHeader,
    BlockFileLayout,
    InvalidBlockFile,
    read_block_file,
    write_block_file,
)
from triton_disagg.kv_transfer.layout import merge_runs
from triton_disagg.router.hashing import BlockHash

logger = logging.getLogger(__name__)

#: Block file reads of one job in flight at once.
READ_THREADS = 4


# -- operations ----------------------------------------------------------------------


@dataclass(slots=True)
class CopyBlocks:
    """Copy blocks `src[src_ids[i]]` to `dst[dst_ids[i]]` (pools of one block layout)."""

    src: torch.Tensor
    src_ids: list[int]
    dst: torch.Tensor
    dst_ids: list[int]
    ok: bool = False
    elapsed_s: float = 0.0


@dataclass(slots=True)
class WriteFile:
    """Write block `src[slot]` (host memory) to a block file."""

    src: torch.Tensor
    slot: int
    path: Path
    header: BlockFileHeader
    ok: bool = False
    elapsed_s: float = 0.0


@dataclass(slots=True)
class ReadFile:
    """Read and check the block file of `block_hash` into `dst[block_id]`."""

    path: Path
    block_hash: BlockHash
    dst: torch.Tensor
    block_id: int
    ok: bool = False
    error: str = ""
    elapsed_s: float = 0.0


@dataclass(slots=True)
class DeleteFile:
    path: Path
    ok: bool = False
    elapsed_s: float = 0.0


CopyOp = CopyBlocks | WriteFile | ReadFile | DeleteFile


class Lane(enum.Enum):
    URGENT = "urgent"  # onboarding: memory thread, first
    BACKGROUND = "background"  # offloads to host memory: memory thread, in order
    DISK = "disk"  # block file writes and deletions: disk thread, in order


@dataclass(slots=True, eq=False)
class CopyJob:
    """Operations run in order on its lane's thread. `done` is set once all ran (each says if it succeeded)."""

    ops: list[CopyOp]
    lane: Lane
    #: Whatever the submitter needs back when the job completes.
    context: object = None
    #: On CUDA: recorded on the submitter's stream, so copies out of the device pool wait for its writes.
    ready_event: object = None
    #: Submitted by the copier once this job ran, if every op succeeded; else set `followup_dropped`.
    followup: CopyJob | None = None
    followup_dropped: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def urgent(self) -> bool:
        return self.lane is Lane.URGENT


# -- movers ----------------------------------------------------------------------------


class BlockMover(Protocol):
    """Moves block bytes on the copy thread; every call returns once its bytes are in place."""

    #: How many `read_file` calls may run at once (on the copier's reader threads).
    max_parallel_reads: int

    def register_pool(self, pool: torch.Tensor) -> None:
        """A long-lived pool copies will read and write (the device pool is known from the start)."""

    def copy_blocks(self, op: CopyBlocks, ready_event: object) -> None:
        """Copy the blocks; raises on a transport error."""

    def write_file(self, op: WriteFile, layout: BlockFileLayout) -> None:
        """Write the block file; raises OSError."""

    def read_file(self, op: ReadFile, layout: BlockFileLayout) -> None:
        """Read the block file into its block; raises InvalidBlockFile or OSError."""


def block_bytes_view(pool: torch.Tensor, index: int) -> memoryview:
    """The bytes of block `index` of a host pool, as a writable memoryview (no copy)."""
    return memoryview(pool[index].view(torch.uint8).numpy()).cast("B")


class TorchMover:
    """Host pools: `memmove` per run of consecutive blocks (no thread pool, GIL released).
    CUDA pools: `copy_` on a side stream, synchronised before returning. Files: `pwritev`/`preadv`."""

    max_parallel_reads = READ_THREADS

    def __init__(self, device: torch.device):
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._local = threading.local()  # per reader thread: a pinned block for disk reads into a CUDA pool

    def register_pool(self, pool: torch.Tensor) -> None:
        pass

    def copy_blocks(self, op: CopyBlocks, ready_event: object) -> None:
        runs = merge_runs(op.dst_ids, op.src_ids)
        if op.src.is_cuda or op.dst.is_cuda:
            with torch.cuda.stream(self._stream):
                if ready_event is not None:
                    self._stream.wait_event(ready_event)
                for dst_start, src_start, count in runs:
                    op.dst[dst_start : dst_start + count].copy_(op.src[src_start : src_start + count], non_blocking=True)
            self._stream.synchronize()
            return
        block_bytes = op.src[0].numel() * op.src.element_size()
        src_base, dst_base = op.src.data_ptr(), op.dst.data_ptr()
        for dst_start, src_start, count in runs:
            ctypes.memmove(dst_base + dst_start * block_bytes, src_base + src_start * block_bytes, count * block_bytes)

    def write_file(self, op: WriteFile, layout: BlockFileLayout) -> None:
        write_block_file(op.path, layout, op.header, block_bytes_view(op.src, op.slot))

    def read_file(self, op: ReadFile, layout: BlockFileLayout) -> None:
        if not op.dst.is_cuda:
            read_block_file(op.path, layout, op.block_hash, block_bytes_view(op.dst, op.block_id))
            return
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = torch.empty((1, *op.dst.shape[1:]), dtype=op.dst.dtype, pin_memory=True)
        read_block_file(op.path, layout, op.block_hash, block_bytes_view(staging, 0))
        with torch.cuda.stream(self._stream):
            op.dst[op.block_id].copy_(staging[0], non_blocking=True)
        self._stream.synchronize()


# -- the thread ------------------------------------------------------------------------


class TierCopier:
    """Runs CopyJobs on a memory thread and a disk thread; finished jobs come out of `completed` as they end."""

    def __init__(self, mover: BlockMover, layout: BlockFileLayout, on_done: Callable[[], None] | None = None):
        self.mover = mover
        self.layout = layout
        #: Called on a copier thread after each job (the engine thread's wake-up).
        self.on_done = on_done
        self.completed: queue.SimpleQueue[CopyJob] = queue.SimpleQueue()
        self._lanes: dict[Lane, deque[CopyJob]] = {lane: deque() for lane in Lane}
        self._num_unfinished = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kv-tier-read")
        self._threads = [
            threading.Thread(target=self._run, args=((Lane.URGENT, Lane.BACKGROUND),), name="kv-tier-copier", daemon=True),
            threading.Thread(target=self._run, args=((Lane.DISK,),), name="kv-tier-disk", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def num_unfinished(self) -> int:
        """Jobs submitted and not yet done."""
        with self._cond:
            return self._num_unfinished

    def submit(self, job: CopyJob) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the tier copier is closed")
            self._lanes[job.lane].append(job)
            self._num_unfinished += 1
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted job (and its followup) is done; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._num_unfinished == 0, timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish the queued jobs (up to `timeout_s`), then stop the threads. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline_s = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(deadline_s - time.monotonic(), 0.0))
        self._readers.shutdown(wait=False)

    def _run(self, lanes: tuple[Lane, ...]) -> None:
        while True:
            with self._cond:
                # A stopping copier still runs the followups of the jobs it finishes.
                while not (any(self._lanes[lane] for lane in lanes) or (self._stopping and not self._num_unfinished)):
                    self._cond.wait()
                queued = next((self._lanes[lane] for lane in lanes if self._lanes[lane]), None)
                if queued is None:
                    return
                job = queued.popleft()
            self._run_job(job)
            with self._cond:
                if job.followup is not None:
                    if all(op.ok for op in job.ops):
                        self._lanes[job.followup.lane].append(job.followup)
                        self._num_unfinished += 1
                    else:
                        job.followup_dropped = True
                self.completed.put(job)
                job.done.set()
                self._num_unfinished -= 1
                self._cond.notify_all()
            if self.on_done is not None:
                self.on_done()

    def _run_job(self, job: CopyJob) -> None:
        reads = [op for op in job.ops if type(op) is ReadFile]
        parallel = len(reads) > 1 and self.mover.max_parallel_reads > 1
        if parallel:
            list(self._readers.map(lambda op: self._run_op(op, job), reads))
        for op in job.ops:
            if not (parallel and type(op) is ReadFile):
                self._run_op(op, job)

    def _run_op(self, op: CopyOp, job: CopyJob) -> None:
        started_s = time.perf_counter()
        try:
            if type(op) is CopyBlocks:
                self.mover.copy_blocks(op, job.ready_event)
            elif type(op) is WriteFile:
                self.mover.write_file(op, self.layout)
            elif type(op) is ReadFile:
                self.mover.read_file(op, self.layout)
            else:
                op.path.unlink(missing_ok=True)
            op.ok = True
        except InvalidBlockFile as exc:
            op.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - reported through the op; the job's other ops still run
            logger.warning("KV tier %s failed: %s", type(op).__name__, exc, exc_info=not isinstance(exc, OSError))
            if type(op) is ReadFile:
                op.error = f"{type(exc).__name__}: {exc}"
        op.elapsed_s = time.perf_counter() - started_s
