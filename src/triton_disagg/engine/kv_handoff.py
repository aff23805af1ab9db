"""Moving a prompt's KV between engines: holds on the prefill side, pulls on the decode side.

Prefill side: a request added with `hold_kv` keeps its blocks after its
first token, until the decode worker's release notification arrives or the
hold times out, so a decode that never pulls cannot leak them.

Decode side: a request added with `RemoteKV` gets blocks for its whole
prompt (its own prefix-cache hits count), pulls only the blocks it misses,
and joins the batch as a decode once they arrived. If the pull cannot start,
fails or times out, it falls back to computing the prompt locally: the
request completes with the same tokens. Blocks a pull may still write into
are freed only once the transfer has ended. With lower KV tiers, the
prompt blocks this worker has in host memory or on disk are brought back
first (`Onboarding`), and only the blocks still missing are pulled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from triton_disagg.engine.block_manager import BlockManager
from triton_disagg.engine.kv_connector import KVConnector, RemoteKV, TransferState
from triton_disagg.engine.onboarding import OnboardStart, Onboarding
from triton_disagg.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class HandoffStats:
    """Monotonic counters, exported as metrics."""

    holds_started: int = 0
    holds_released: int = 0
    holds_expired: int = 0
    pulls_started: int = 0
    pulls_done: int = 0
    pulls_fallback: int = 0  # pull failed or timed out: prompt recomputed locally
    blocks_pulled: int = 0
    blocks_reused_locally: int = 0  # prompt blocks the decode worker already had cached


@dataclass(slots=True)
class _Pull:
    seq: Sequence
    remote: RemoteKV
    transfer: object | None = None
    num_blocks: int = 0
    deadline_s: float = 0.0
    aborted: bool = False


@dataclass(slots=True)
class _Hold:
    seq: Sequence
    deadline_s: float


@dataclass(slots=True)
class KVHandoff:
    block_manager: BlockManager
    connector: KVConnector | None
    hold_timeout_s: float = 30.0
    pull_timeout_s: float = 30.0
    #: Brings back prompt blocks from this worker's lower tiers before a pull (None: no tiers).
    onboarding: Onboarding | None = None
    stats: HandoffStats = field(default_factory=HandoffStats)
    _holds: dict[str, _Hold] = field(default_factory=dict)
    _queued: deque[_Pull] = field(default_factory=deque)  # waiting for blocks
    _onboarding: dict[str, _Pull] = field(default_factory=dict)  # local lower-tier blocks coming back first
    _onboarded: list[_Pull] = field(default_factory=list)  # ... which came back: start their pulls
    _pulls: dict[str, _Pull] = field(default_factory=dict)  # transfers in flight

    @property
    def needs_polling(self) -> bool:
        """Whether `advance` has work even when no request is running."""
        return bool(self._holds or self._queued or self._pulls or self._onboarded)

    @property
    def num_held_blocks(self) -> int:
        return sum(len(hold.seq.block_ids) for hold in self._holds.values())

    # -- prefill side -------------------------------------------------------------

    def hold(self, seq: Sequence) -> None:
        """Keep a finished request's blocks for a decode worker to pull."""
        self._holds[seq.request_id] = _Hold(seq, time.monotonic() + self.hold_timeout_s)
        self.stats.holds_started += 1

    def release(self, hold_id: str) -> bool:
        """Free a hold's blocks (the decode worker has them). False for an unknown or expired hold."""
        if not self._free_hold(hold_id):
            return False
        self.stats.holds_released += 1
        return True

    def _free_hold(self, hold_id: str) -> bool:
        hold = self._holds.pop(hold_id, None)
        if hold is not None:
            self.block_manager.free(hold.seq)
        return hold is not None

    # -- decode side ----------------------------------------------------------------

    def enqueue_pull(self, seq: Sequence, remote: RemoteKV) -> None:
        seq.status = SequenceStatus.PULLING_KV
        seq.append_token(remote.first_token_id)
        self._queued.append(_Pull(seq, remote))

    def owns(self, request_id: str) -> bool:
        return request_id in self._holds or request_id in self._pulls

    def resume_onboarded(self, seq: Sequence) -> bool:
        """Take back a pulling `seq` whose local lower-tier blocks are in; False if it is not one of ours."""
        pull = self._onboarding.get(seq.request_id)
        if pull is None or pull.seq is not seq:
            return False
        del self._onboarding[seq.request_id]
        seq.status = SequenceStatus.PULLING_KV
        self._onboarded.append(pull)
        return True

    def abort_hold(self, hold_id: str) -> bool:
        """Free a hold at once (its request was cancelled after the first token)."""
        return self._free_hold(hold_id)

    def abort(self, seq: Sequence) -> bool:
        """Forget a pulling `seq`; blocks a live transfer targets are freed when it ends. False if not ours."""
        for waiting in (self._queued, self._onboarded):  # no transfer in flight: free at once
            for pull in waiting:
                if pull.seq is seq:
                    waiting.remove(pull)
                    self.block_manager.free(seq)
                    self._finish(pull, None)
                    return True
        pull = self._onboarding.get(seq.request_id)
        if pull is not None and pull.seq is seq:
            del self._onboarding[seq.request_id]
            self.onboarding.abort(seq)  # its blocks are freed when the copy ends
            self._finish(pull, None)
            return True
        if (pull := self._pulls.get(seq.request_id)) is not None:
            pull.aborted = True
            return True
        return False

    def advance(self) -> list[Sequence]:
        """Apply releases and expiries, poll pulls, start queued ones.

        Returns sequences ready for the scheduler: pulled ones with the whole
        prompt computed, and fallbacks with only their local cache hits computed.
        """
        now = time.monotonic()
        if self.connector is not None:
            for hold_id in self.connector.released_holds():
                self.release(hold_id)
        for hold_id in [h for h, hold in self._holds.items() if hold.deadline_s <= now]:
            logger.warning("KV hold %s expired before a decode worker released it; freeing its blocks", hold_id)
            self._free_hold(hold_id)
            self.stats.holds_expired += 1
        ready = self._poll_pulls(now)
        onboarded, self._onboarded = self._onboarded, []
        for pull in onboarded:
            self._start_or_ready(pull, now, ready)
        while self._queued:
            pull = self._queued[0]
            seq = pull.seq
            if self.onboarding is not None:
                started = self.onboarding.try_start(seq)
                if started is OnboardStart.STARTED:
                    self._queued.popleft()
                    self._onboarding[seq.request_id] = pull
                    continue
                if started is OnboardStart.NO_BLOCKS:
                    break
            if not self.block_manager.allocate_slots(seq, seq.num_tokens):
                break  # wait for blocks, in arrival order
            self._queued.popleft()
            self._start_or_ready(pull, now, ready)
        return ready

    def _start_or_ready(self, pull: _Pull, now: float, ready: list[Sequence]) -> None:
        if self._start(pull, now):
            self._pulls[pull.seq.request_id] = pull
        else:
            ready.append(pull.seq)

    def _start(self, pull: _Pull, now: float) -> bool:
        """Start the pull of the blocks `seq` misses; False when it needs no transfer (or cannot have one)."""
        seq, handle = pull.seq, pull.remote.handle
        block_size = self.block_manager.block_size
        first_missing = seq.num_computed_tokens // block_size  # local prefix hits
        num_prompt_blocks = -(-seq.num_prompt_tokens // block_size)
        self.stats.blocks_reused_locally += first_missing
        if first_missing >= num_prompt_blocks:
            seq.num_computed_tokens = seq.num_prompt_tokens
            self._finish(pull, None)
            return False
        try:
            pull.transfer = self.connector.start_pull(
                handle, seq.block_ids[first_missing:num_prompt_blocks], list(handle.block_ids[first_missing:num_prompt_blocks])
            )
        except Exception as exc:  # noqa: BLE001 - any failure to start means: compute locally
            logger.warning("KV pull for %s could not start (%s); prefilling locally", seq.request_id, exc)
            self._fall_back(pull)
            return False
        pull.num_blocks = num_prompt_blocks - first_missing
        pull.deadline_s = now + self.pull_timeout_s
        self.stats.pulls_started += 1
        return True

    def _poll_pulls(self, now: float) -> list[Sequence]:
        ready: list[Sequence] = []
        for request_id, pull in list(self._pulls.items()):
            state = self.connector.poll(pull.transfer)
            if state == TransferState.PENDING and now >= pull.deadline_s:
                if not self.connector.cancel(pull.transfer):
                    continue  # the blocks may still be written: keep waiting
                pull.transfer = None
                logger.warning("KV pull for %s timed out after %.1f s", request_id, self.pull_timeout_s)
                state = TransferState.FAILED
            if state == TransferState.PENDING:
                continue
            del self._pulls[request_id]
            if pull.aborted:
                self.block_manager.free(pull.seq)
                self._finish(pull, pull.transfer)
                continue
            if state == TransferState.DONE:
                pull.seq.num_computed_tokens = pull.seq.num_prompt_tokens
                self.stats.pulls_done += 1
                self.stats.blocks_pulled += pull.num_blocks
                self._finish(pull, pull.transfer)
            else:
                logger.warning("KV pull for %s failed; prefilling locally", request_id)
                self._fall_back(pull)
            ready.append(pull.seq)
        return ready

    def _fall_back(self, pull: _Pull) -> None:
        """Recompute locally: keep the blocks, count only the local cache hits as computed."""
        pull.seq.num_computed_tokens = pull.seq.num_cached_tokens
        self.stats.pulls_fallback += 1
        self._finish(pull, pull.transfer)

    def _finish(self, pull: _Pull, transfer: object | None) -> None:
        if self.connector is not None:
            self.connector.finish(transfer, pull.remote.handle)
