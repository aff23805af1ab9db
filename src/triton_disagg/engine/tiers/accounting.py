"""What the lower KV tiers count: their stats (exported as metrics) and block uses (for disk admission)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from triton_disagg.router.hashing import BlockHash


@dataclass(slots=True)
class TierStats:
    """Monotonic counters of the lower tiers, keyed by tier ("host", "disk"), exported as metrics."""

    #: Blocks copied into the tier: host from the device pool, disk from host memory.
    offloaded_blocks: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    #: Blocks brought back from the tier into the device pool for a prefix hit.
    onboarded_blocks: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    #: Blocks the tier dropped to make room.
    evicted_blocks: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    #: Bytes copied into the tier, and out of it.
    bytes_in: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    bytes_out: dict[str, int] = field(default_factory=lambda: {"host": 0, "disk": 0})
    #: Seconds the copier spent moving those bytes.
    seconds_in: dict[str, float] = field(default_factory=lambda: {"host": 0.0, "disk": 0.0})
    seconds_out: dict[str, float] = field(default_factory=lambda: {"host": 0.0, "disk": 0.0})
    #: Disk blocks found corrupt, truncated or foreign (at start or when read), dropped.
    invalid_blocks: int = 0
    #: Blocks evicted from host memory that the admission policy kept off the disk.
    not_admitted_blocks: int = 0
    #: Freed blocks not offloaded: host memory had no slot that could be evicted.
    skipped_offloads: int = 0
    #: Blocks host memory evicted and the disk would have taken, skipped: too many writes were pending.
    skipped_disk_writes: int = 0
    #: Device blocks whose reuse had to wait for their offload to finish, and the seconds it took.
    offload_waits: int = 0
    offload_wait_seconds: float = 0.0
    #: Seconds the engine thread spent deciding and applying copies (flush, poll, start_onboard).
    bookkeeping_seconds: float = 0.0


class UseCounter:
    """How many times each of the `capacity` most recently used blocks was used."""

    def __init__(self, capacity: int):
        self.capacity = max(capacity, 1)
        self._counts: OrderedDict[BlockHash, int] = OrderedDict()

    def record(self, block_hash: BlockHash) -> None:
        self._counts[block_hash] = self._counts.pop(block_hash, 0) + 1
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)

    def count(self, block_hash: BlockHash) -> int:
        return self._counts.get(block_hash, 0)
