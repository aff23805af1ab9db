"""Chained KV block hashes, shared by the engine (prefix cache) and the router.

A block's hash covers its parent's hash, its token ids and any extra keys
(LoRA id, cache salt), so equal hashes mean equal prefixes. The function is
stable across processes and machines (blake2b over a fixed little-endian
encoding); Python's built-in `hash` is not.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", int)  # unsigned 64-bit

#: Parent hash of a sequence's first block. A different root (a salt) gives a
#: disjoint hash space, e.g. per tenant.
ROOT_HASH = BlockHash(int.from_bytes(hashlib.blake2b(b"triton-disagg/kv-block/v1", digest_size=8).digest(), "little"))


def _encode_extra_key(key: object) -> bytes:
    if isinstance(key, bool) or key is None:
        return b"n" if key is None else (b"T" if key else b"F")
    if isinstance(key, int):
        return b"i" + key.to_bytes(16, "little", signed=True)
    if isinstance(key, str):
        raw = key.encode()
        return b"s" + len(raw).to_bytes(4, "little") + raw
    if isinstance(key, bytes):
        return b"b" + len(key).to_bytes(4, "little") + key
    raise TypeError(f"extra hash keys must be int, str, bytes, bool or None, got {type(key).__name__}")


def hash_block_tokens(
    parent_hash: BlockHash | None,
    token_ids: Sequence[int],
    extra_keys: tuple[object, ...] = (),
) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    parent = ROOT_HASH if parent_hash is None else parent_hash
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack(f"<QI{len(token_ids)}I", parent, len(token_ids), *token_ids))
    for key in extra_keys:
        h.update(_encode_extra_key(key))
    return BlockHash(int.from_bytes(h.digest(), "little"))


def hash_request_tokens(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[object, ...] = (),
    parent_hash: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids`; a trailing partial block has none."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent_hash)
    return hashes
