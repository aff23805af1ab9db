"""Block allocator: reference counts, prefix hits, eviction order, events, and no leaks."""

from __future__ import annotations

import random

import pytest

from triton_disagg.engine.block_manager import BlockManager
from triton_disagg.engine.params import SamplingParams
from triton_disagg.engine.sequence import Sequence
from triton_disagg.router.events import AllCleared, BlockStored
from triton_disagg.router.hashing import hash_request_tokens

BLOCK_SIZE = 4


def make_manager(**overrides) -> BlockManager:
    return BlockManager(**({"num_blocks": 8, "block_size": BLOCK_SIZE} | overrides))


def make_seq(tokens: list[int], request_id: str = "r", **overrides) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams(**overrides), BLOCK_SIZE)


def run_prefill(manager: BlockManager, seq: Sequence) -> None:
    """Allocate and 'compute' the whole sequence, as the engine would in one step."""
    assert manager.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit(seq)


def test_allocate_takes_blocks_in_order_and_free_returns_them():
    manager = make_manager()
    seq = make_seq(list(range(10)))  # 10 tokens: 3 blocks, the last partial
    assert manager.allocate_slots(seq, 10)
    assert seq.block_ids == [0, 1, 2]
    assert [manager.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    assert manager.num_free_blocks == 5
    manager.free(seq)
    assert manager.num_free_blocks == 8
    assert seq.block_ids == []
    manager.check_integrity()


def test_allocation_fails_without_side_effects_when_pool_is_short():
    manager = make_manager(num_blocks=2)
    seq = make_seq(list(range(9)))  # needs 3 blocks
    assert not manager.allocate_slots(seq, 9)
    assert seq.block_ids == [] and manager.num_free_blocks == 2
    manager.check_integrity()


def test_shared_prefix_is_reused_with_reference_counts():
    manager = make_manager()
    first = make_seq(list(range(9)), "a")  # blocks [0..3] [4..7] + 1 token
    run_prefill(manager, first)
    assert first.block_ids == [0, 1, 2]
    second = make_seq(list(range(8)) + [42, 43], "b")
    assert manager.allocate_slots(second, second.num_uncomputed_tokens)
    assert second.block_ids == [0, 1, 3]
    assert second.num_cached_tokens == second.num_computed_tokens == 8
    assert [manager.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    manager.free(first)
    assert [manager.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    manager.free(second)
    assert manager.num_free_blocks == 8
    manager.check_integrity()


def test_full_prompt_hit_still_computes_the_last_block():
    manager = make_manager()
    run_prefill(manager, make_seq(list(range(8)), "a"))
    again = make_seq(list(range(8)), "b")
    assert manager.allocate_slots(again, 8)
    # 8 tokens = 2 full cached blocks, but the last token must run to give logits.
    assert again.num_cached_tokens == 4
    assert again.block_ids[0] == 0 and again.block_ids[1] != 1


def test_eviction_reuses_uncached_blocks_first_then_least_recently_freed_tail_first():
    manager = make_manager(num_blocks=6)
    a = make_seq(list(range(8)), "a")  # 2 full blocks -> cached
    b = make_seq(list(range(100, 108)), "b")
    run_prefill(manager, a)
    run_prefill(manager, b)
    c = make_seq([7, 7], "c")  # partial block, never cached
    run_prefill(manager, c)
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1], [2, 3], [4])
    manager.free(a)
    manager.free(b)
    manager.free(c)
    manager.drain_events()
    # Queue: uncached 4, never-used 5, then a's tail 1, a's head 0, b's tail 3, b's head 2.
    d = make_seq(list(range(200, 224)), "d")  # 6 blocks: takes everything in queue order
    assert manager.allocate_slots(d, 24)
    assert d.block_ids == [4, 5, 1, 0, 3, 2]
    removed = [event.block_hashes[0] for event in manager.drain_events()]
    a_hashes = hash_request_tokens(list(range(8)), BLOCK_SIZE)
    b_hashes = hash_request_tokens(list(range(100, 108)), BLOCK_SIZE)
    assert removed == [a_hashes[1], a_hashes[0], b_hashes[1], b_hashes[0]]
    manager.check_integrity()


def test_uncached_free_block_goes_before_never_used_ones():
    manager = make_manager(num_blocks=3)
    c = make_seq([7, 7], "c")
    run_prefill(manager, c)
    manager.free(c)
    d = make_seq([1], "d")
    assert manager.allocate_slots(d, 1)
    assert d.block_ids == [0]


def test_cache_hit_on_a_free_block_takes_it_out_of_the_free_queue():
    manager = make_manager(num_blocks=3)
    a = make_seq(list(range(5)), "a")
    run_prefill(manager, a)
    manager.free(a)
    b = make_seq(list(range(4)) + [9, 9, 9, 9, 9], "b")  # hit on block 0, then 2 new blocks
    assert manager.allocate_slots(b, 9)
    assert b.block_ids[0] == 0 and sorted(b.block_ids) == [0, 1, 2]
    assert manager.num_free_blocks == 0
    manager.check_integrity()


def test_hit_counted_against_free_blocks_when_pool_is_short():
    manager = make_manager(num_blocks=2)
    a = make_seq(list(range(5)), "a")
    run_prefill(manager, a)
    manager.free(a)
    b = make_seq(list(range(4)) + [9] * 5, "b")  # hit on block 0 (free), needs 2 more: only 1 left
    assert not manager.allocate_slots(b, 9)
    assert manager.num_free_blocks == 2 and b.block_ids == []
    manager.check_integrity()


def test_events_stored_with_parent_and_removed_and_cleared():
    manager = make_manager(num_blocks=4)
    seq = make_seq(list(range(8)), "a")
    assert manager.allocate_slots(seq, 4)
    seq.num_computed_tokens = 4
    manager.commit(seq)
    assert manager.allocate_slots(seq, 4)
    seq.num_computed_tokens = 8
    manager.commit(seq)
    h0, h1 = hash_request_tokens(list(range(8)), BLOCK_SIZE)
    assert manager.drain_events() == [
        BlockStored((h0,), None, (0, 1, 2, 3), BLOCK_SIZE),
        BlockStored((h1,), h0, (4, 5, 6, 7), BLOCK_SIZE),
    ]
    assert not manager.reset_prefix_cache()  # refused while held
    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.drain_events() == [AllCleared()]
    assert manager.num_cached_blocks == 0
    big = make_seq(list(range(16)), "b")
    assert manager.allocate_slots(big, 16)
    assert manager.drain_events() == []  # nothing cached any more, so nothing removed


def test_duplicate_block_is_not_cached_twice():
    manager = make_manager()
    a, b = make_seq(list(range(4)) + [1], "a"), make_seq(list(range(4)) + [2], "b")
    assert manager.allocate_slots(a, 5) and manager.allocate_slots(b, 5)  # both miss: computed concurrently
    for seq in (a, b):
        seq.num_computed_tokens = 5
        manager.commit(seq)
    events = manager.drain_events()
    assert len(events) == 1 and manager.num_cached_blocks == 1
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8
    manager.check_integrity()


def test_extra_keys_separate_prefix_caches():
    manager = make_manager()
    run_prefill(manager, Sequence("a", list(range(9)), SamplingParams(), BLOCK_SIZE, extra_keys=("lora-1",)))
    other = Sequence("b", list(range(9)), SamplingParams(), BLOCK_SIZE, extra_keys=("lora-2",))
    assert manager.allocate_slots(other, 9)
    assert other.num_cached_tokens == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_request_mix_returns_every_block(seed):
    """Random prompts with shared prefixes, partial decodes and frees in random order."""
    rng = random.Random(seed)
    manager = make_manager(num_blocks=32)
    live: list[Sequence] = []
    for step in range(300):
        if live and (rng.random() < 0.4 or len(live) > 6):
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
        else:
            prefix = list(range(rng.choice([0, 4, 8, 12])))
            seq = make_seq(prefix + [rng.randrange(50) for _ in range(rng.randrange(1, 10))], f"s{step}")
            if manager.allocate_slots(seq, seq.num_uncomputed_tokens):
                seq.num_computed_tokens = seq.num_tokens
                manager.commit(seq)
                for _ in range(rng.randrange(6)):  # decode a few tokens
                    seq.append_token(rng.randrange(50))
                    if not manager.allocate_slots(seq, 1):
                        break
                    seq.num_computed_tokens += 1
                    manager.commit(seq)
                live.append(seq)
        manager.check_integrity()
    for seq in live:
        manager.free(seq)
    assert manager.num_free_blocks == 32
    manager.check_integrity()
