"""Owns the model and the KV pool; turns a scheduled batch into one forward pass."""

from __future__ import annotations

import torch

from triton_disagg.engine.attention import AttentionMetadata, PrefillSlice
from triton_disagg.engine.config import ModelConfig
from triton_disagg.engine.model import CausalLM
from triton_disagg.engine.scheduler import ScheduledBatch


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element_bytes = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * element_bytes


class ModelRunner:
    """Runs forward passes for the engine thread.

    `kv_pool` is one contiguous tensor `(num_blocks, L, 2, block_size, KVH, D)`;
    its storage never moves, so it can be registered for transfers once.
    """

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        config = model.config
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_pool = torch.zeros(
            (num_blocks, config.num_hidden_layers, 2, block_size, config.num_key_value_heads, config.head_dim),
            dtype=dtype,
            device=device,
        )

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
        for entry in batch.entries:
            seq, start = entry.seq, entry.seq.num_computed_tokens
            end = start + entry.num_new_tokens
            query_start = len(input_ids)
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_block_ids.extend(seq.block_ids[pos // self.block_size] for pos in range(start, end))
            if entry.num_new_tokens == 1:
                decode_tables.append(seq.block_ids[: -(-end // self.block_size)])
                decode_lens.append(end)
            else:
                prefills.append(
                    PrefillSlice(
                        query_start=query_start,
                        num_query_tokens=entry.num_new_tokens,
                        num_context_tokens=start,
                        block_ids=torch.tensor(seq.block_ids[: -(-end // self.block_size)], device=self.device),
                    )
                )
            if entry.samples:
                logits_indices.append(len(input_ids) - 1)

        to_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        position_tensor = to_tensor(positions)
        meta = AttentionMetadata(
            slot_block_ids=to_tensor(slot_block_ids),
            slot_offsets=position_tensor % self.block_size,
            num_decode_tokens=len(decode_lens),
            decode_block_tables=self._pad_tables(decode_tables) if decode_tables else None,
            decode_seq_lens=to_tensor(decode_lens) if decode_lens else None,
            prefills=prefills,
        )
        return self.model(to_tensor(input_ids), position_tensor, self.kv_pool, meta, to_tensor(logits_indices))

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:  # (B, max_blocks)
        width = max(len(table) for table in tables)
        return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int64, device=self.device)
