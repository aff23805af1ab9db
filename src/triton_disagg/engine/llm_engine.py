"""The engine: requests in, one continuous-batching step at a time, tokens out."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from triton_disagg.engine.block_manager import BlockManager
from triton_disagg.engine.config import EngineConfig, ModelConfig
from triton_disagg.engine.eplb_state import EplbState, validate_expert_parallel
from triton_disagg.engine.kv_connector import KVConnector, RemoteKV
from triton_disagg.engine.kv_handoff import KVHandoff
from triton_disagg.engine.loader import load_model
from triton_disagg.engine.model_runner import ModelRunner, kv_bytes_per_block
from triton_disagg.engine.onboarding import Onboarding
from triton_disagg.engine.params import (
    FinishReason,
    InvalidRequest,
    RequestOutput,
    SamplingParams,
)
from triton_disagg.engine.sampler import sample
from triton_disagg.engine.scheduler import Scheduler
from triton_disagg.engine.sequence import Sequence, SequenceStatus
from triton_disagg.engine.tiers.block_file import PAYLOAD_OFFSET, BlockFileLayout, model_fingerprint
from triton_disagg.engine.tiers.cache import TieredKVCache
from triton_disagg.kv_transfer.handle import InvalidKVHandle
from triton_disagg.router.events import KVEvent


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of load, for metrics and routing."""

    num_running: int
    num_waiting: int
    num_waiting_prompt_tokens: int
    #: Prompt tokens of running requests not prefilled yet (a chunked prefill in progress).
    num_prefilling_tokens: int
    num_free_blocks: int
    num_blocks: int
    num_cached_blocks: int

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks


class LLMEngine:
    """Runs requests on one model and one KV pool. Not thread-safe: see `EngineThread`."""

    def __init__(self, config: EngineConfig, kv_connector_factory=None):
        """`kv_connector_factory(kv_pool) -> KVConnector` enables KV holds and pulls (disaggregation)."""
        config.validate()
        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model_path)
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.eos_token_ids = self._read_eos_token_ids(Path(config.model_path))
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks or max(
            1, config.kv_cache_bytes // kv_bytes_per_block(self.model_config, config.block_size, self.dtype)
        )
        validate_expert_parallel(config, self.model_config)
        self.model = load_model(config.model_path, self.device, self.dtype)
        #: Expert load statistics and expert parallelism of an MoE model; None for a dense one.
        self.eplb = EplbState(self.model, self.model_config, config, self.device, self.dtype) if self.model_config.is_moe else None
        self.runner = ModelRunner(
            self.model,
            self.num_blocks,
            config.block_size,
            self.device,
            self.dtype,
            config.attention_backend,
            cuda_graphs=not config.enforce_eager,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
        )
        #: Host-memory and disk tiers under the pool; None when both are off.
        try:
            self.tiers = self._make_tiers(config)
        except BaseException:
            if self.eplb is not None:  # its ranks would outlive the failed load
                self.eplb.close()
            raise
        self.block_manager = BlockManager(
            self.num_blocks, config.block_size, config.enable_prefix_caching, offloader=self.tiers
        )
        self.onboarding = Onboarding(self.block_manager, self.tiers) if self.tiers is not None else None
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.onboarding
        )
        connector: KVConnector | None = kv_connector_factory(self.runner.kv_pool) if kv_connector_factory else None
        self.kv_connector = connector
        self.handoff = KVHandoff(
            self.block_manager, connector, config.kv_hold_timeout_s, config.kv_pull_timeout_s, self.onboarding
        )
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._rng = random.Random(config.seed)
        self._is_stalled = False  # the last step could do nothing: wait for a copy, a request or an abort

    # -- requests ----------------------------------------------------------------

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequest if the request can never run here. Reads only configuration."""
        params.validate()
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequest("the prompt is empty; send at least one token")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if num_prompt >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {num_prompt} tokens; the context window is {self.max_model_len} tokens "
                "and must leave room for at least one output token. Shorten the prompt."
            )
        if num_prompt + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"the prompt ({num_prompt} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"context window of {self.max_model_len} tokens. Reduce max_tokens to at most "
                f"{self.max_model_len - num_prompt}."
            )
        num_blocks = self.block_manager.num_blocks_for(num_prompt + params.max_tokens)
        if num_blocks > self.num_blocks:
            raise InvalidRequest(
                f"the request needs {num_blocks} KV blocks but this worker's pool has {self.num_blocks}. "
                "Reduce max_tokens or the prompt, or give the worker more KV blocks."
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        extra_keys: tuple[object, ...] = (),
        hold_kv: bool = False,
        remote_kv: RemoteKV | None = None,
    ) -> None:
        """Queue a request.

        `extra_keys` (LoRA id, salt) separate its prefix cache from others'.
        `hold_kv` keeps its blocks after it finishes, for a decode worker to pull
        (the final output lists them). `remote_kv` says the prompt was prefilled
        elsewhere: its KV is pulled instead of computed, and decoding starts
        after the prefill's first token.
        """
        if request_id in self._seqs or self.handoff.owns(request_id):
            raise InvalidRequest(f"request id {request_id!r} is already running")
        self.validate_request(prompt_token_ids, params)
        if remote_kv is not None:
            self._validate_remote_kv(prompt_token_ids, params, remote_kv)
        generator = None
        if not params.is_greedy:
            seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        seq = Sequence(request_id, prompt_token_ids, params, self.block_size, extra_keys, generator)
        seq.hold_kv = hold_kv
        self._seqs[request_id] = seq
        self._is_stalled = False
        if remote_kv is None:
            self.scheduler.add(seq)
        else:
            self.handoff.enqueue_pull(seq, remote_kv)

    def release_kv(self, hold_id: str) -> bool:
        """Free the blocks held for `hold_id` (the decode worker has pulled them)."""
        self._is_stalled = False
        return self.handoff.release(hold_id)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; its ABORT output comes with the next `step()`.

        Blocks a copy or transfer may still write are freed once it ended.
        """
        self._is_stalled = False
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return self.handoff.abort_hold(request_id)
        if not self.handoff.abort(seq) and not (self.onboarding is not None and self.onboarding.abort(seq)):
            self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._aborted.append(self._output(seq, [], FinishReason.ABORT))
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._seqs) or bool(self._aborted)

    def needs_polling(self) -> bool:
        """Whether `step()` must be called again soon with nothing else to wake it (KV holds and pulls)."""
        return self.handoff.needs_polling

    def has_work(self) -> bool:
        """Whether `step()` can make progress now.

        False while the only requests wait on tier copies (the copier wakes the
        caller, see `set_copy_done_callback`) or on blocks; `needs_polling`
        says when KV transfers must be polled meanwhile.
        """
        if self._aborted or (self.tiers is not None and self.tiers.has_completions):
            return True
        return bool(self._seqs) and not self._is_stalled

    def set_copy_done_callback(self, callback) -> None:
        """Call `callback()` (on the copier thread) whenever a tier copy finishes."""
        if self.tiers is not None:
            self.tiers.copier.on_done = callback

    # -- stepping ------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return the tokens it produced and the requests that ended."""
        outputs, self._aborted = self._aborted, []
        num_readied = 0
        if self.onboarding is not None:
            self.tiers.flush()  # blocks freed since the last step (aborts, releases) before they are reused
            for seq in self.onboarding.advance():
                num_readied += 1
                if not self.handoff.resume_onboarded(seq):
                    self.scheduler.add_ready(seq)
        for seq in self.handoff.advance():
            num_readied += 1
            self.scheduler.add_ready(seq)
        batch = self.scheduler.schedule()
        self._is_stalled = batch.is_empty and not num_readied
        if batch.is_empty:
            return outputs
        sampling = [entry for entry in batch.entries if entry.samples]
        if self.eplb is not None:
            self.eplb.before_step()
        logits = self.runner.execute(batch)
        if self.eplb is not None:
            self.eplb.after_step()
        tokens = sample(logits, [e.seq.params for e in sampling], [e.seq.generator for e in sampling])
        for entry in batch.entries:
            entry.seq.num_computed_tokens += entry.num_new_tokens
            self.block_manager.commit(entry.seq)
        for entry, token in zip(sampling, tokens):
            seq = entry.seq
            seq.append_token(token)
            reason = self._finish_reason(seq, token)
            output = self._output(seq, [token], reason)
            if reason is not None:
                del self._seqs[seq.request_id]
                if seq.hold_kv and reason == FinishReason.LENGTH:  # a stop needs no decode: nothing to hold
                    output.held_block_ids = tuple(seq.block_ids)
                    output.held_block_hashes = tuple(seq.hashes_up_to(seq.num_prompt_tokens // self.block_size))
                    self.scheduler.detach(seq)
                    self.handoff.hold(seq)
                else:
                    self.scheduler.remove(seq)
            outputs.append(output)
        if self.tiers is not None:
            self.tiers.flush()  # the step's freed blocks go to host memory as one batch, off this thread
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion; output token ids in prompt order. For tests and benchmarks."""
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"generate-{self._rng.getrandbits(64):016x}-{i}" for i in range(len(prompts))]
        for request_id, prompt, param in zip(ids, prompts, param_list):
            self.add_request(request_id, prompt, param)
        results: dict[str, list[int]] = {request_id: [] for request_id in ids}
        while any(request_id in self._seqs for request_id in ids):
            for output in self.step():
                results[output.request_id].extend(output.new_token_ids)
        return [results[request_id] for request_id in ids]

    def drain_kv_events(self) -> list[KVEvent]:
        """KV events of every tier since the last call (each medium's events in order)."""
        events = self.block_manager.drain_events()
        if self.tiers is not None:
            events.extend(self.tiers.drain_events())
        return events

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block in every tier (one AllCleared event). Refused (False) while a block is held."""
        if self.tiers is not None:
            self.tiers.wait_idle()
        if not self.block_manager.reset_prefix_cache():
            return False
        if self.tiers is not None:
            self.tiers.clear()
        return True

    def check_integrity(self, expect_idle: bool = False) -> None:
        """Raise if block or tier accounting is off. With `expect_idle` (no request in flight), every
        device block must be free and, once the tiers' copies are waited for, nothing may be in flight."""
        self.block_manager.check_integrity()
        if expect_idle and self.block_manager.num_free_blocks != self.num_blocks:
            raise RuntimeError(f"{self.num_blocks - self.block_manager.num_free_blocks} blocks still held with no request")
        if self.tiers is not None:
            if expect_idle:
                self.tiers.wait_idle()
            self.tiers.check_integrity(expect_idle)

    def shutdown(self) -> None:
        """Release what outlives a Python object: the expert-parallel ranks, the tiers' copy threads
        (queued copies finish first) and the disk folder's lock. Idempotent."""
        if self.eplb is not None:
            self.eplb.close()
        if self.tiers is not None:
            self.tiers.close()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_waiting_prompt_tokens=sum(seq.num_uncomputed_tokens for seq in self.scheduler.waiting),
            num_prefilling_tokens=sum(
                seq.num_prompt_tokens - seq.num_computed_tokens for seq in self.scheduler.running if seq.is_prefilling
            ),
            num_free_blocks=self.block_manager.num_free_blocks,
            num_blocks=self.num_blocks,
            num_cached_blocks=self.block_manager.num_cached_blocks,
        )

    # -- internals -----------------------------------------------------------------

    def _validate_remote_kv(self, prompt_token_ids: list[int], params: SamplingParams, remote_kv: RemoteKV) -> None:
        handle = remote_kv.handle
        if handle.block_size != self.block_size:
            raise InvalidKVHandle(f"kv_handle block size {handle.block_size} differs from this worker's {self.block_size}")
        if handle.num_tokens != len(prompt_token_ids):
            raise InvalidKVHandle(f"kv_handle covers {handle.num_tokens} tokens but the prompt has {len(prompt_token_ids)}")
        if not 0 <= remote_kv.first_token_id < self.model_config.vocab_size:
            raise InvalidRequest(f"first token id {remote_kv.first_token_id} is outside the vocabulary")
        if params.max_tokens < 2:
            raise InvalidRequest("a request prefilled elsewhere must leave max_tokens >= 2 for decoding")

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.params
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def _output(seq: Sequence, tokens: list[int], reason: FinishReason | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tokens,
            finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_host_hit_tokens=seq.num_host_hit_tokens,
            num_disk_hit_tokens=seq.num_disk_hit_tokens,
        )

    def _make_tiers(self, config: EngineConfig) -> TieredKVCache | None:
        """The host (and disk) tiers the configuration asks for, or None. Raises ValueError for a bad setting."""
        if not config.enable_prefix_caching:
            return None
        block_bytes = kv_bytes_per_block(self.model_config, config.block_size, self.dtype)
        host_blocks = config.kv_host_blocks if config.kv_host_blocks is not None else config.kv_host_bytes // block_bytes
        if host_blocks == 0:
            return None
        disk_folder, disk_blocks = None, 0
        if config.kv_disk_path:
            disk_folder = Path(config.kv_disk_path).expanduser()
            disk_blocks = (
                config.kv_disk_blocks
                if config.kv_disk_blocks is not None
                else config.kv_disk_bytes // (block_bytes + PAYLOAD_OFFSET)
            )
        layout = BlockFileLayout.of_pool(self.runner.kv_pool, model_fingerprint(config.model_path))
        mover = None
        if config.kv_tier_transport == "nixl":
            from triton_disagg.engine.tiers.nixl_mover import NixlMover

            mover = NixlMover(self.runner.kv_pool)
        return TieredKVCache(
            self.runner.kv_pool, host_blocks, layout, disk_folder, disk_blocks, config.kv_disk_min_uses, mover
        )

    def _read_eos_token_ids(self, model_path: Path) -> tuple[int, ...]:
        eos = set(self.model_config.eos_token_ids)
        generation_config = model_path / "generation_config.json"
        if generation_config.is_file():
            value = json.loads(generation_config.read_text()).get("eos_token_id")
            eos.update(value if isinstance(value, list) else [] if value is None else [value])
        return tuple(sorted(eos))
