"""What a prefill worker hands back with the first token: where the prompt's KV sits.

A `KVHandle` travels as an opaque UINT8 tensor (msgpack). A decode worker
trusts none of it: `KVHandle.decode` validates every field, and the decode
worker then checks the agent and the layout against the directory.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgpack

from triton_disagg.errors import InvalidRequest

#: Bumped whenever the handle's fields or the pool layout convention change.
HANDLE_VERSION = 1


class TransferState(enum.Enum):
    """Where a KV pull stands, as a connector's `poll` reports it."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class InvalidKVHandle(InvalidRequest):
    """A KV handle that is malformed, forged, stale, or names an unknown agent."""


@dataclass(slots=True, frozen=True)
class KVHandle:
    """The prompt's KV in a prefill worker's pool, held until released or expired.

    `block_ids[i]` holds tokens `[i * block_size, (i + 1) * block_size)` of the
    prompt; the last block may be partial. `block_hashes` covers the full
    blocks only. The prefill worker frees the blocks when it gets the
    release notification named `hold_id`, or after its hold timeout.
    """

    agent_name: str
    hold_id: str
    block_ids: tuple[int, ...]
    block_hashes: tuple[int, ...]
    num_tokens: int
    block_size: int
    version: int = HANDLE_VERSION

    def encode(self) -> bytes:
        return msgpack.packb(
            [self.version, self.agent_name, self.hold_id, list(self.block_ids), list(self.block_hashes), self.num_tokens, self.block_size]
        )

    @classmethod
    def decode(cls, raw: bytes) -> "KVHandle":
        """Parse and validate a handle; raises InvalidKVHandle naming what is wrong."""
        try:
            fields = msgpack.unpackb(raw, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types
            raise InvalidKVHandle(f"kv_handle is not a valid handle encoding ({type(exc).__name__})") from None
        if not isinstance(fields, list) or len(fields) != 7:
            raise InvalidKVHandle("kv_handle has the wrong structure")
        version, agent, hold_id, block_ids, block_hashes, num_tokens, block_size = fields
        if version != HANDLE_VERSION:
            raise InvalidKVHandle(f"kv_handle version {version!r} is not supported (expected {HANDLE_VERSION})")
        if not isinstance(agent, str) or not agent or not isinstance(hold_id, str):
            raise InvalidKVHandle("kv_handle agent name and hold id must be non-empty strings")
        if not isinstance(block_size, int) or block_size < 1:
            raise InvalidKVHandle(f"kv_handle block_size {block_size!r} is invalid")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise InvalidKVHandle(f"kv_handle num_tokens {num_tokens!r} is invalid")
        if not isinstance(block_ids, list) or not all(isinstance(b, int) and b >= 0 for b in block_ids):
            raise InvalidKVHandle("kv_handle block ids must be non-negative integers")
        if len(block_ids) != -(-num_tokens // block_size):
            raise InvalidKVHandle(
                f"kv_handle has {len(block_ids)} blocks for {num_tokens} tokens of block size {block_size}"
            )
        if not isinstance(block_hashes, list) or len(block_hashes) != num_tokens // block_size:
            raise InvalidKVHandle("kv_handle must carry one hash per full block")
        if not all(isinstance(h, int) and 0 <= h < 2**64 for h in block_hashes):
            raise InvalidKVHandle("kv_handle block hashes must be unsigned 64-bit integers")
        return cls(agent, hold_id, tuple(block_ids), tuple(block_hashes), num_tokens, block_size, version)
