"""Decode steps replayed from CUDA graphs, one graph per captured batch size.

A small model's decode step on a GPU is a few hundred kernel launches of a
few microseconds each: launched one by one from Python it is launch-bound
(a flat ~21 ms a step whatever the batch, measured on an H100). Captured
once at start and replayed, the whole step is one launch.

A graph reads fixed buffers: the step's token ids, positions, KV slots,
block tables and lengths are copied into them (host to device, without
waiting) and a batch is padded up to the next captured size. Padding rows
write their K/V into a scratch block past the end of the pool that no
sequence owns, and attend to that block alone. Batches with a prefill
chunk, or larger or longer than captured, run eagerly.

Nothing here runs without a GPU: `tests/unit/test_cuda_graphs.py` checks,
with TRITON_DISAGG_TEST_DEVICE=cuda, that replayed steps produce the
tokens eager steps produce.
"""

from __future__ import annotations

import logging

import torch

from triton_disagg.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture, ascending: 1, 2, 4, 8, then every 8 up to `max_num_seqs` (always included)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 8))
    return sorted(set(sizes + [max_num_seqs]))


def padded_size(sizes: list[int], num_seqs: int) -> int | None:
    """The smallest captured size that holds `num_seqs`, or None if none does."""
    return next((size for size in sizes if size >= num_seqs), None)


class DecodeGraphs:
    """Captured decode steps of `model` over `kv_storage` (the pool plus one scratch block, the last).

    `run` replays the graph for a decode-only batch; `can_run` says whether one fits.
    Construction captures every size (a few seconds on a GPU) and raises if capture fails.
    """

    def __init__(self, model, kv_storage: torch.Tensor, backend, block_size: int, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.kv_storage = kv_storage
        self.backend = backend
        self.block_size = block_size
        self.scratch_block = kv_storage.shape[0] - 1
        self.sizes = capture_sizes(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        device = kv_storage.device
        largest = self.sizes[-1]
        self._input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self._positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self._slot_block_ids = torch.full((largest,), self.scratch_block, dtype=torch.int64, device=device)
        self._slot_offsets = torch.zeros(largest, dtype=torch.int64, device=device)
        self._tables = torch.full((largest, self.max_blocks), self.scratch_block, dtype=torch.int64, device=device)
        self._seq_lens = torch.ones(largest, dtype=torch.int64, device=device)
        self._logits_indices = torch.arange(largest, device=device)
        # Host staging for one step's inputs, pinned so the copies need no synchronisation. The engine
        # samples (and so synchronises) between steps, so a copy in flight is never overwritten.
        self._staging = torch.zeros((5, largest), dtype=torch.int64).pin_memory()
        self._staging_tables = torch.zeros((largest, self.max_blocks), dtype=torch.int64).pin_memory()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]] = {}
        self._capture_all()

    def can_run(self, num_seqs: int, max_blocks_per_seq: int) -> bool:
        return num_seqs <= self.sizes[-1] and max_blocks_per_seq <= self.max_blocks

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_block_ids: list[int],
        block_tables: list[list[int]],
        seq_lens: list[int],
    ) -> torch.Tensor:  # (B, vocab) float32: a view of the graph's output, valid until the next replay
        """Replay the decode step for B sequences (B <= the largest captured size)."""
        num_seqs = len(input_ids)
        size = padded_size(self.sizes, num_seqs)
        staging = self._staging
        staging[:, :size] = 0
        staging[0, :num_seqs] = torch.tensor(input_ids)
        staging[1, :num_seqs] = torch.tensor(positions)
        staging[2, :size] = self.scratch_block
        staging[2, :num_seqs] = torch.tensor(slot_block_ids)
        staging[3, :num_seqs] = staging[1, :num_seqs] % self.block_size
        staging[4, :size] = 1
        staging[4, :num_seqs] = torch.tensor(seq_lens)
        tables = self._staging_tables[:size]  # (size, max_blocks)
        tables.fill_(self.scratch_block)
        for row, table in enumerate(block_tables):
            tables[row, : len(table)] = torch.tensor(table)
        for target, source in (
            (self._input_ids, staging[0]),
            (self._positions, staging[1]),
            (self._slot_block_ids, staging[2]),
            (self._slot_offsets, staging[3]),
            (self._seq_lens, staging[4]),
        ):
            target[:size].copy_(source[:size], non_blocking=True)
        self._tables[:size].copy_(tables, non_blocking=True)
        graph, logits, meta = self._graphs[size]
        self._plan(meta, size, block_tables, seq_lens)
        graph.replay()
        return logits[:num_seqs]

    # -- capture --------------------------------------------------------------------

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_block_ids=self._slot_block_ids[:size],
            slot_offsets=self._slot_offsets[:size],
            num_decode_tokens=size,
            decode_block_tables=self._tables[:size],
            decode_seq_lens=self._seq_lens[:size],
            prefills=[],
            decode_block_table_lists=[[self.scratch_block]] * size,
            decode_seq_len_list=[1] * size,
            backend=self.backend,
        )

    def _plan(self, meta: AttentionMetadata, size: int, block_tables: list[list[int]], seq_lens: list[int]) -> None:
        """Backends that plan on the host (FlashInfer) plan the padded batch into the graph's own buffers."""
        if self.backend.name != "flashinfer":
            return
        from triton_disagg.engine.attention_cuda import paged_table

        padding = size - len(block_tables)
        tables = block_tables + [[self.scratch_block]] * padding
        lens = seq_lens + [1] * padding
        self.backend.plan_decode(meta.plan, paged_table(tables, lens, self.block_size, self.kv_storage.device))

    def _capture_all(self) -> None:
        memory_pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its memory
            meta = self._meta(size)
            if self.backend.name == "flashinfer":
                meta.plan = self.backend.graph_decode_wrapper(size, self.max_blocks, self.kv_storage.device)
                self._plan(meta, size, [], [])
            args = (self._input_ids[:size], self._positions[:size], self.kv_storage, meta, self._logits_indices[:size])
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: lazy initialisation and allocator state, outside the graph
                    self.model(*args)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                logits = self.model(*args)
            self._graphs[size] = (graph, logits, meta)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s (%s attention)", self.sizes, self.backend.name)
