"""The disk tier's file format: one file per KV block, a checked header, then the block's bytes.

    offset 0     magic b"TDKVBLK\\0", format version (u32), header length (u32), header CRC-32 (u32)
    offset 20    header: block hash (u64), parent hash (u64), has-parent flag (u8), payload length
                 (u64), payload CRC-32 (u32), then the pool layout as JSON (model fingerprint,
                 dtype, block shape)
    offset 4096  payload: the block as it sits in the KV pool, (L, 2, block_size, KVH, D)

A file is served only when every check passes: magic, version, header CRC,
the layout equal to the reader's, the hash equal to the one asked for, the
payload complete and its CRC equal. Anything else raises `InvalidBlockFile`
(a corrupt, truncated or foreign file); the caller drops it and recomputes.
The payload starts on a 4 KiB boundary, so direct and GPU-direct I/O can
read it in place. A read is one `preadv` of header and payload together:
on a cold disk a second I/O per block would double its cost.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_disagg.router.hashing import BlockHash

MAGIC = b"TDKVBLK\x00"
#: Bumped whenever the layout of the file changes; files of another version are foreign.
FORMAT_VERSION = 1
PAYLOAD_OFFSET = 4096
_PREFIX = struct.Struct("<8sIII")  # magic, version, header length, header CRC-32
_FIXED = struct.Struct("<QQBQI")  # block hash, parent hash, has parent, payload length, payload CRC-32
SUFFIX = ".kvblock"


class InvalidBlockFile(Exception):
    """A block file that must not be served: corrupt, truncated, foreign, or not the block asked for."""


@dataclass(slots=True, frozen=True)
class BlockFileLayout:
    """What a block's bytes mean: a file is read back only into a pool of the same layout."""

    #: Identifies the checkpoint the KV was computed with (`model_fingerprint`).
    model_fingerprint: str
    dtype: str
    #: (L, 2, block_size, KVH, D)
    block_shape: tuple[int, ...]

    @classmethod
    def of_pool(cls, kv_pool: torch.Tensor, model_fingerprint: str) -> BlockFileLayout:
        return cls(model_fingerprint, str(kv_pool.dtype).removeprefix("torch."), tuple(kv_pool.shape[1:]))

    @property
    def block_bytes(self) -> int:
        numel = 1
        for dim in self.block_shape:
            numel *= dim
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def as_dict(self) -> dict:
        return {"model": self.model_fingerprint, "dtype": self.dtype, "block_shape": list(self.block_shape)}

    @property
    def encoded(self) -> bytes:
        """The layout as stored in a header; a file is foreign unless these bytes match exactly."""
        return json.dumps(self.as_dict(), separators=(",", ":"), sort_keys=True).encode()


@dataclass(slots=True, frozen=True)
class BlockFileHeader:
    block_hash: BlockHash
    parent_hash: BlockHash | None


def model_fingerprint(model_path: str | Path) -> str:
    """A short id of a checkpoint: its config.json, and each weight file's name, size, first and last MiB.

    Cheap for any checkpoint size; two checkpoints that differ only inside
    the middle of a weight file with the same config would collide, which no
    fine-tune or conversion does in practice.
    """
    path = Path(model_path)
    digest = hashlib.blake2b(digest_size=16)
    digest.update((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
            handle.seek(max(size - (1 << 20), 0))
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()


def file_name(block_hash: BlockHash) -> str:
    return f"{block_hash:016x}{SUFFIX}"


def encode_header(layout: BlockFileLayout, header: BlockFileHeader, payload: memoryview) -> bytes:
    """The first PAYLOAD_OFFSET bytes of a block file whose payload is `payload` (its CRC is computed here)."""
    parent = header.parent_hash
    body = _FIXED.pack(
        header.block_hash, parent or 0, parent is not None, payload.nbytes, zlib.crc32(payload)
    ) + layout.encoded
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), zlib.crc32(body))
    if len(prefix) + len(body) > PAYLOAD_OFFSET:
        raise ValueError(f"block file header of {len(body)} bytes does not fit before offset {PAYLOAD_OFFSET}")
    return (prefix + body).ljust(PAYLOAD_OFFSET, b"\0")


def write_block_file(path: Path, layout: BlockFileLayout, header: BlockFileHeader, payload: memoryview) -> None:
    """Write a block file (header, then payload). Raises OSError; a partial file fails its checks when read."""
    head = encode_header(layout, header, payload)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwritev(fd, [head, payload], 0)
    finally:
        os.close(fd)


def parse_header(head: bytes, layout: BlockFileLayout, file_size: int) -> tuple[BlockFileHeader, int]:
    """The header in a file's first PAYLOAD_OFFSET bytes and its payload's CRC-32, checked against `layout`.

    Raises InvalidBlockFile for a wrong magic or version, a header that fails
    its CRC, another layout, or a file of the wrong size (truncated).
    """
    if len(head) < _PREFIX.size + _FIXED.size:
        raise InvalidBlockFile("truncated header")
    magic, version, length, crc = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise InvalidBlockFile("not a KV block file (bad magic)")
    if version != FORMAT_VERSION:
        raise InvalidBlockFile(f"format version {version}, expected {FORMAT_VERSION}")
    body = head[_PREFIX.size : _PREFIX.size + length]
    if len(body) != length or length < _FIXED.size or zlib.crc32(body) != crc:
        raise InvalidBlockFile("header fails its checksum")
    block_hash, parent_hash, has_parent, payload_bytes, payload_crc = _FIXED.unpack_from(body)
    if body[_FIXED.size :] != layout.encoded or payload_bytes != layout.block_bytes:
        raise InvalidBlockFile(f"written for another pool layout: {bytes(body[_FIXED.size :])[:200]!r}")
    if file_size != PAYLOAD_OFFSET + payload_bytes:
        raise InvalidBlockFile(f"truncated: {file_size} bytes, expected {PAYLOAD_OFFSET + payload_bytes}")
    return BlockFileHeader(BlockHash(block_hash), BlockHash(parent_hash) if has_parent else None), payload_crc


def read_header(fd: int, layout: BlockFileLayout) -> tuple[BlockFileHeader, int]:
    """`parse_header` of an open block file."""
    return parse_header(os.pread(fd, PAYLOAD_OFFSET, 0), layout, os.fstat(fd).st_size)


def read_block_file(path: Path, layout: BlockFileLayout, block_hash: BlockHash, out: memoryview) -> None:
    """Read the payload of block `block_hash` into `out` (layout.block_bytes bytes), checking everything.

    Raises InvalidBlockFile (contents of `out` are then undefined) or OSError.
    """
    head = bytearray(PAYLOAD_OFFSET)
    fd = os.open(path, os.O_RDONLY)
    try:
        num_read = os.preadv(fd, [head, out], 0)
        file_size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    header, payload_crc = parse_header(head, layout, file_size)
    if header.block_hash != block_hash:
        raise InvalidBlockFile(f"holds block {header.block_hash:016x}, not {block_hash:016x}")
    if num_read != PAYLOAD_OFFSET + out.nbytes:
        raise InvalidBlockFile("truncated payload")
    if zlib.crc32(out) != payload_crc:
        raise InvalidBlockFile("payload fails its checksum")
