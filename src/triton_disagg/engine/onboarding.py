"""Requests whose cached prompt blocks come back from host memory or disk before they run.

When a fresh sequence reaches the head of the queue, its prompt's block
hashes are walked through the tiers in order: the leading blocks cached in
the device pool, then the following ones found in host memory or on disk,
up to the first block in no tier. If any came from a lower tier, the
sequence takes the device hits and new blocks for its whole prompt, the
lower-tier blocks are copied into theirs by the copier thread, and the
sequence leaves the queue: other requests keep stepping meanwhile. When the
copy is done, the leading blocks that arrived intact count as computed
(they join the prefix cache) and the sequence goes back to the head of the
queue to compute the rest.

An aborted sequence keeps its blocks until its copy has ended (the copier
may still be writing them), then frees them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from triton_disagg.engine.block_manager import BlockManager
from triton_disagg.engine.sequence import Sequence, SequenceStatus
from triton_disagg.engine.tiers.cache import OnboardTicket, TieredKVCache
from triton_disagg.router.events import Medium


class OnboardStart(enum.Enum):
    STARTED = "started"  # the sequence left the queue; `advance` returns it once its blocks are in
    NOT_NEEDED = "not_needed"  # nothing in a lower tier: allocate as usual
    NO_BLOCKS = "no_blocks"  # too few free blocks for its prompt: try again later


@dataclass(slots=True)
class _Onboarding:
    seq: Sequence
    ticket: OnboardTicket
    num_device_hits: int
    is_aborted: bool = False


class Onboarding:
    """Sequences waiting for lower-tier blocks. Engine thread only."""

    def __init__(self, block_manager: BlockManager, tiers: TieredKVCache):
        self.block_manager = block_manager
        self.tiers = tiers
        # By ticket, not request id: an aborted request's id may come back while its copy still runs.
        self._active: dict[OnboardTicket, _Onboarding] = {}

    @property
    def num_active(self) -> int:
        return len(self._active)

    def try_start(self, seq: Sequence) -> OnboardStart:
        """Start bringing back `seq`'s lower-tier prompt blocks, if it has any.

        Only for a sequence without blocks (fresh, or preempted). On STARTED
        it holds blocks for `seq.num_tokens` tokens and is ONBOARDING; on
        the other results nothing changed.
        """
        if seq.block_ids or seq.num_computed_tokens:
            return OnboardStart.NOT_NEEDED
        block_size = self.block_manager.block_size
        hashes = seq.hashes_up_to((seq.num_tokens - 1) // block_size)  # the last token is always computed
        device_hits: list[int] = []
        while len(device_hits) < len(hashes):
            block_id = self.block_manager.cached_block_id(hashes[len(device_hits)])
            if block_id is None:
                break
            device_hits.append(block_id)
        media: list[Medium] = []
        for block_hash in hashes[len(device_hits) :]:
            medium = self.tiers.find(block_hash)
            if medium is None:
                break
            media.append(medium)
        if not media:
            return OnboardStart.NOT_NEEDED
        if not self.block_manager.allocate_prefix(seq, device_hits, seq.num_tokens):
            return OnboardStart.NO_BLOCKS
        first, end = len(device_hits), len(device_hits) + len(media)
        ticket = self.tiers.start_onboard(seq.request_id, hashes[first:end], media, seq.block_ids[first:end])
        seq.status = SequenceStatus.ONBOARDING
        self._active[ticket] = _Onboarding(seq, ticket, len(device_hits))
        return OnboardStart.STARTED

    def abort(self, seq: Sequence) -> bool:
        """Forget an onboarding `seq`; its blocks are freed once its copy ended. False if not ours."""
        onboarding = next((o for o in self._active.values() if o.seq is seq), None)
        if onboarding is None:
            return False
        onboarding.is_aborted = True
        return True

    def advance(self) -> list[Sequence]:
        """Finish the onboardings whose copies ended; return their sequences, ready to compute the rest."""
        ready: list[Sequence] = []
        block_size = self.block_manager.block_size
        for ticket in self.tiers.poll():
            onboarding = self._active.pop(ticket)
            seq = onboarding.seq
            if onboarding.is_aborted:
                self.block_manager.free(seq)
                continue
            num_blocks = onboarding.num_device_hits + ticket.num_ready
            seq.num_computed_tokens = seq.num_cached_tokens = num_blocks * block_size
            seq.num_host_hit_tokens = ticket.num_ready_from(Medium.HOST) * block_size
            seq.num_disk_hit_tokens = ticket.num_ready_from(Medium.DISK) * block_size
            self.block_manager.commit(seq)  # the blocks that arrived join the device's prefix cache
            seq.status = SequenceStatus.WAITING
            ready.append(seq)
        return ready
