"""How a worker's KV pool sits in memory, so a peer can address its blocks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import msgpack
import torch


@dataclass(slots=True, frozen=True)
class PoolLayout:
    """A registered KV pool: block `i` spans `[base_addr + i * block_bytes, + block_bytes)`.

    Two pools can exchange blocks only when `block_shape`, `dtype` and so
    `block_bytes` agree (`is_compatible`); addresses and sizes may differ.
    """

    agent_name: str
    mem_type: str  # "DRAM" or "VRAM"
    device_id: int
    base_addr: int
    num_blocks: int
    block_bytes: int
    block_shape: tuple[int, ...]  # (L, 2, block_size, KVH, D)
    dtype: str
    model_name: str = ""  # the Triton model serving this pool, for control requests
    #: gRPC endpoint ("host:port") of the Triton server running that model, as other servers reach it;
    #: "": the server of the KV directory. Its host is the address the worker's NIXL agent is reached at.
    server_url: str = ""

    @classmethod
    def of_pool(cls, agent_name: str, kv_pool: torch.Tensor, model_name: str = "") -> "PoolLayout":
        if not kv_pool.is_contiguous():
            raise ValueError("the KV pool must be one contiguous tensor")
        device = kv_pool.device
        return cls(
            agent_name=agent_name,
            mem_type="VRAM" if device.type == "cuda" else "DRAM",
            device_id=device.index or 0,
            base_addr=kv_pool.data_ptr(),
            num_blocks=kv_pool.shape[0],
            block_bytes=kv_pool[0].numel() * kv_pool.element_size(),
            block_shape=tuple(kv_pool.shape[1:]),
            dtype=str(kv_pool.dtype).removeprefix("torch."),
            model_name=model_name,
        )

    @property
    def block_size(self) -> int:
        return self.block_shape[2]

    def is_compatible(self, other: "PoolLayout") -> bool:
        return (self.block_shape, self.dtype, self.block_bytes) == (other.block_shape, other.dtype, other.block_bytes)

    def block_addr(self, block_id: int) -> int:
        return self.base_addr + block_id * self.block_bytes

    def encode(self) -> bytes:
        return msgpack.packb(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> "PoolLayout":
        fields = msgpack.unpackb(raw)
        fields["block_shape"] = tuple(fields["block_shape"])
        return cls(**fields)


def merge_runs(local_ids: list[int], remote_ids: list[int]) -> list[tuple[int, int, int]]:
    """Pair blocks into runs `(local_start, remote_start, num_blocks)` consecutive on both sides.

    Each run becomes one transfer descriptor, so a prompt whose blocks were
    allocated in order moves with a handful of descriptors instead of one per block.
    """
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"{len(local_ids)} local blocks but {len(remote_ids)} remote blocks")
    runs: list[tuple[int, int, int]] = []
    for local, remote in zip(local_ids, remote_ids):
        if runs:
            start_local, start_remote, length = runs[-1]
            if local == start_local + length and remote == start_remote + length:
                runs[-1] = (start_local, start_remote, length + 1)
                continue
        runs.append((local, remote, 1))
    return runs
