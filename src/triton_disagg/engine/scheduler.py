"""Continuous batching: which sequences run in the next step, and with how many tokens.

Each step has a token budget (`max_num_batched_tokens`). Running sequences go
first (a decode costs one token), then waiting prompts join in arrival order,
a long prompt taking only the budget that is left (chunked prefill) and
finishing in later steps. When blocks run out, the most recently admitted
sequence is preempted: its blocks are freed and it is recomputed later
(its full blocks usually come back from the prefix cache).

With lower KV tiers, a prompt at the head of the queue whose cached blocks
sit in host memory or on disk leaves the queue while they are copied back
(`Onboarding`), and returns to its head once they are in.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from triton_disagg.engine.block_manager import BlockManager
from triton_disagg.engine.onboarding import OnboardStart, Onboarding
from triton_disagg.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last known token, so yields a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class ScheduledBatch:
    """One step's work. Single-token entries come first: the model attends them as one batch."""

    entries: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(entry.num_new_tokens for entry in self.entries)

    @property
    def is_empty(self) -> bool:
        return not self.entries


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        onboarding: Onboarding | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.onboarding = onboarding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_ready(self, seq: Sequence) -> None:
        """Queue a sequence that already holds its blocks (pulled KV, or a fallback) ahead of new prompts."""
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def detach(self, seq: Sequence) -> None:
        """Take a finished `seq` out of the queues but leave its blocks allocated (a KV hold)."""
        self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finish or abort)."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def schedule(self) -> ScheduledBatch:
        """Pick the next step's sequences and allocate their blocks.

        Mutates sequence statuses, block tables and the queues; does not
        advance `num_computed_tokens` (the engine does, after the step ran).
        """
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                idx += 1

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.onboarding is not None:
                started = self.onboarding.try_start(seq)
                if started is OnboardStart.STARTED:
                    self.waiting.popleft()
                    continue
                if started is OnboardStart.NO_BLOCKS:
                    break
            if not self.block_manager.allocate_slots(seq, min(seq.num_uncomputed_tokens, budget)):
                break  # first come, first served: no overtaking a prompt that does not fit
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_new = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        batch.entries = sorted(scheduled, key=lambda entry: entry.num_new_tokens != 1)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = seq.num_host_hit_tokens = seq.num_disk_hit_tokens = 0
        self.waiting.appendleft(seq)
