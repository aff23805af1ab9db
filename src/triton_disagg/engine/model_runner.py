"""Owns the model and the KV pool; turns a scheduled batch into one forward pass."""

from __future__ import annotations

import logging

import torch

from triton_disagg.engine.attention import AttentionMetadata, PrefillSlice
from triton_disagg.engine.attention_backends import select_attention_backend
from triton_disagg.engine.config import ModelConfig
from triton_disagg.engine.model import CausalLM
from triton_disagg.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * element_bytes


class ModelRunner:
    """Runs forward passes for the engine thread.

    `kv_pool` is one contiguous tensor `(num_blocks, L, 2, block_size, KVH, D)`;
    its storage never moves, so it can be registered for transfers once. With
    CUDA graphs one scratch block follows it in the same allocation (padding
    rows of a replayed batch write there); the model reads `_kv_storage`.
    """

    def __init__(
        self,
        model: CausalLM,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        attention_backend: str = "auto",
        cuda_graphs: bool = False,
        max_num_seqs: int = 64,
        max_model_len: int = 2048,
    ):
        """`attention_backend`: one of `config.ATTENTION_BACKENDS`; raises ValueError if it cannot run here.

        `cuda_graphs` captures decode steps of up to `max_num_seqs` sequences of up to
        `max_model_len` tokens (CUDA and dense models only; ignored otherwise).
        """
        config = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.attention = select_attention_backend(
            attention_backend, device, dtype, config.num_attention_heads, config.num_key_value_heads, config.head_dim, block_size
        )
        use_graphs = cuda_graphs and device.type == "cuda" and not config.is_moe
        self._kv_storage = torch.zeros(
            (num_blocks + int(use_graphs), config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim),
            dtype=dtype,
            device=device,
        )
        self.kv_pool = self._kv_storage[:num_blocks]
        self.graphs = None
        if use_graphs:
            from triton_disagg.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, self._kv_storage, self.attention, block_size, max_num_seqs, max_model_len)

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:  # (num sampling entries, vocab) float32
        """Compute the batch's new tokens into the pool; logits for the entries that sample.

        Rows of the result follow the order of `batch.entries` filtered by `samples`.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slot_block_ids: list[int] = []
        logits_indices: list[int] = []
        prefills: list[PrefillSlice] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        to_tensor = self._to_device
        for entry in batch.entries:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            end = start + entry.num_new_tokens
            query_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_block_ids.extend(seq.block_ids[pos // self.block_size] for pos in range(start, end))
            block_ids = seq.block_ids[: -(-end // self.block_size)]
            if entry.num_new_tokens == 1:
                decode_tables.append(block_ids)
                decode_lens.append(end)
            else:
                prefills.append(
                    PrefillSlice(
                        query_start=query_start,
                        num_query_tokens=entry.num_new_tokens,
                        num_context_tokens=start,
                        block_ids=to_tensor(block_ids),
                        block_id_list=block_ids,
                    )
                )
            if entry.samples:
                logits_indices.append(len(input_ids) - 1)

        width = max((len(table) for table in decode_tables), default=0)
        if self.graphs is not None and not prefills and self.graphs.can_run(len(decode_lens), width):
            return self.graphs.run(input_ids, positions, slot_block_ids, decode_tables, decode_lens)
        position_tensor = to_tensor(positions)
        meta = AttentionMetadata(
            slot_block_ids=to_tensor(slot_block_ids),
            slot_offsets=position_tensor % self.block_size,
            num_decode_tokens=len(decode_lens),
            decode_block_tables=to_tensor([t + [0] * (width - len(t)) for t in decode_tables]) if decode_tables else None,
            decode_seq_lens=to_tensor(decode_lens) if decode_lens else None,
            prefills=prefills,
            decode_block_table_lists=decode_tables,
            decode_seq_len_list=decode_lens,
            backend=self.attention,
        )
        meta.plan = self.attention.plan(meta)
        return self.model(to_tensor(input_ids), position_tensor, self._kv_storage, meta, to_tensor(logits_indices))

    def _to_device(self, values: list) -> torch.Tensor:
        """int64 on the model's device; on CUDA through pinned memory, so the copy does not wait."""
        tensor = torch.tensor(values, dtype=torch.int64)
        if self.device.type != "cuda":
            return tensor
        return tensor.pin_memory().to(self.device, non_blocking=True)
