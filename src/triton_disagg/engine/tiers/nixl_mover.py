"""A `BlockMover` over NIXL: UCX moves blocks between the device pool and host memory (a transfer to
the agent itself, so GPU memory moves the same way on CUDA), POSIX moves block files.

Chosen with `kv_tier_transport="nixl"`. On CPU the default `TorchMover` is
faster (see `triton_disagg.tools.bench_tiers`, which measures both): a local
UCX transfer costs more than a `memmove`, and each block file must be
registered with the POSIX backend before it can be written. The agent runs
without a progress thread (it would spin a core); the copier thread polls
its transfers.
"""

from __future__ import annotations

import os
import uuid
import zlib

import torch

from triton_disagg.engine.tiers.block_file import (
    PAYLOAD_OFFSET,
    BlockFileLayout,
    InvalidBlockFile,
    encode_header,
    read_header,
)
from triton_disagg.engine.tiers.copier import CopyBlocks, ReadFile, TorchMover, WriteFile, block_bytes_view
from triton_disagg.kv_transfer.layout import merge_runs


class NixlMover:
    """Block moves through one private NIXL agent, between the pools registered with it."""

    max_parallel_reads = 1  # one agent, driven from the copy thread only

    def __init__(self, device_pool: torch.Tensor):
        from nixl._api import nixl_agent, nixl_agent_config

        self.name = f"kv-tiers-{uuid.uuid4().hex[:8]}"
        self._agent = nixl_agent(self.name, nixl_agent_config(enable_prog_thread=False, backends=["UCX", "POSIX"]))
        self._registered: dict[int, str] = {}  # data_ptr -> NIXL memory type
        # Disk reads into GPU memory (POSIX reaches host memory only) go the torch way.
        self._fallback = TorchMover(device_pool.device)
        self.register_pool(device_pool)

    def register_pool(self, pool: torch.Tensor) -> None:
        mem_type = "VRAM" if pool.is_cuda else "DRAM"
        if pool.data_ptr() not in self._registered:
            nbytes = pool.numel() * pool.element_size()
            backends = ["UCX"] if pool.is_cuda else ["UCX", "POSIX"]
            self._agent.register_memory([(pool.data_ptr(), nbytes, _device_id(pool), "")], mem_type, backends=backends)
            self._registered[pool.data_ptr()] = mem_type

    def copy_blocks(self, op: CopyBlocks, ready_event: object) -> None:
        src_type, dst_type = self._registered[op.src.data_ptr()], self._registered[op.dst.data_ptr()]
        if ready_event is not None:
            ready_event.synchronize()  # the step that wrote the device blocks has finished
        block_bytes = op.src[0].numel() * op.src.element_size()
        src, dst = [], []
        for dst_start, src_start, count in merge_runs(op.dst_ids, op.src_ids):
            src.append((op.src.data_ptr() + src_start * block_bytes, count * block_bytes, _device_id(op.src)))
            dst.append((op.dst.data_ptr() + dst_start * block_bytes, count * block_bytes, _device_id(op.dst)))
        self._run(
            "READ", self._agent.get_xfer_descs(dst, dst_type), self._agent.get_xfer_descs(src, src_type), ["UCX"]
        )

    def write_file(self, op: WriteFile, layout: BlockFileLayout) -> None:
        payload = block_bytes_view(op.src, op.slot)
        fd = os.open(op.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, encode_header(layout, op.header, payload), 0)
            self._file_transfer("WRITE", op.src, op.slot, fd, payload.nbytes)
        finally:
            os.close(fd)

    def read_file(self, op: ReadFile, layout: BlockFileLayout) -> None:
        if op.dst.is_cuda:
            self._fallback.read_file(op, layout)
            return
        fd = os.open(op.path, os.O_RDONLY)
        try:
            header, payload_crc = read_header(fd, layout)
            if header.block_hash != op.block_hash:
                raise InvalidBlockFile(f"holds block {header.block_hash:016x}, not {op.block_hash:016x}")
            self._file_transfer("READ", op.dst, op.block_id, fd, layout.block_bytes)
        finally:
            os.close(fd)
        if zlib.crc32(block_bytes_view(op.dst, op.block_id)) != payload_crc:
            raise InvalidBlockFile("payload fails its checksum")

    def _file_transfer(self, operation: str, pool: torch.Tensor, index: int, fd: int, num_bytes: int) -> None:
        file_regs = self._agent.register_memory([(PAYLOAD_OFFSET, num_bytes, fd, "")], "FILE", backends=["POSIX"])
        try:
            memory = self._agent.get_xfer_descs([(pool[index].data_ptr(), num_bytes, 0)], "DRAM")
            file = self._agent.get_xfer_descs([(PAYLOAD_OFFSET, num_bytes, fd)], "FILE")
            self._run(operation, memory, file, ["POSIX"])
        finally:
            self._agent.deregister_memory(file_regs, backends=["POSIX"])

    def _run(self, operation: str, local, remote, backends: list[str]) -> None:
        handle = self._agent.initialize_xfer(operation, local, remote, self.name, backends=backends)
        try:
            state = self._agent.transfer(handle)
            while state == "PROC":
                state = self._agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"NIXL {operation} over {backends[0]} ended in state {state}")
        finally:
            self._agent.release_xfer_handle(handle)


def _device_id(pool: torch.Tensor) -> int:
    return pool.device.index or 0
