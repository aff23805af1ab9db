"""Prefix index: exact state after stored/removed/cleared events, matching, orphans, the cap, dumps."""

from __future__ import annotations

import random

import pytest

from triton_disagg.router.events import AllCleared, BlockRemoved, BlockStored, Medium, WorkerId
from triton_disagg.router.hashing import BlockHash, hash_request_tokens
from triton_disagg.router.index import PrefixIndex, TierMatch, UnknownWorkerError

DEVICE, HOST, DISK = Medium.DEVICE, Medium.HOST, Medium.DISK

BLOCK_SIZE = 4
A, B, C = WorkerId("a"), WorkerId("b"), WorkerId("c")


def chain(*tokens: int) -> list[BlockHash]:
    """Block hashes of a prompt (BLOCK_SIZE tokens a block)."""
    return hash_request_tokens(list(tokens), BLOCK_SIZE)


def stored(hashes: list[BlockHash], parent: BlockHash | None = None, medium: Medium = DEVICE) -> BlockStored:
    return BlockStored(tuple(hashes), parent, (), BLOCK_SIZE, medium)


def make_index(*workers: WorkerId, **overrides) -> PrefixIndex:
    index = PrefixIndex(**overrides)
    for worker_id in workers:
        index.add_worker(worker_id)
    return index


def reference_matches(index: PrefixIndex, hashes: list[BlockHash]) -> dict[WorkerId, int]:
    """Leading held blocks per worker, the slow obvious way, from the dump."""
    scores = {}
    for worker_id, entries in index.dump().items():
        held = {block_hash for block_hash, _ in entries}
        depth = 0
        while depth < len(hashes) and hashes[depth] in held:
            depth += 1
        if depth:
            scores[worker_id] = depth
    return scores


H = chain(*range(16))  # 4 blocks: H[0] .. H[3]
G = chain(*range(8), 99, 99, 99, 99)  # shares H[0], H[1]; then its own block


def test_stored_run_is_indexed_with_parents_and_matched_by_prefix():
    index = make_index(A, B)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, stored(H[2:], parent=H[1]))
    index.apply_event(B, stored(H[:1]))
    # Dump order: least recently stored first; a run is recorded tail first.
    assert index.dump() == {A: [(H[1], H[0]), (H[0], None), (H[3], H[2]), (H[2], H[1])], B: [(H[0], None)]}
    assert index.find_matches(H) == {A: 4, B: 1}
    assert index.find_matches(H[:3]) == {A: 3, B: 1}
    assert index.find_matches(G) == {A: 2, B: 1}
    assert index.find_matches(chain(*range(100, 108))) == {}
    assert index.find_matches([]) == {}
    index.check_integrity()


def test_storing_held_blocks_again_refreshes_without_duplicates():
    index = make_index(A)
    index.apply_event(A, stored(H))
    index.apply_event(A, stored(G[:2]))
    assert index.num_blocks(A) == 4
    assert index.dump()[A] == [(H[3], H[2]), (H[2], H[1]), (H[1], H[0]), (H[0], None)]
    index.check_integrity()


def test_removed_tail_shortens_the_match():
    index = make_index(A)
    index.apply_event(A, stored(H))
    index.apply_event(A, BlockRemoved((H[3], H[2])))
    assert index.find_matches(H) == {A: 2}
    assert index.num_blocks(A) == 2
    index.check_integrity()


def test_removing_a_middle_block_orphans_its_descendants_and_matching_stays_exact():
    index = make_index(A, B)
    index.apply_event(A, stored(H))
    index.apply_event(B, stored(H))
    index.apply_event(A, BlockRemoved((H[1],)))
    # H[2] (child of H[1]) is an orphan on A: A is walked linearly, B by binary search.
    assert index._workers[A].num_orphans == 1
    assert index.find_matches(H) == {A: 1, B: 4}
    index.apply_event(A, stored([H[1]], parent=H[0]))  # the block comes back
    assert index._workers[A].num_orphans == 0
    assert index.find_matches(H) == {A: 4, B: 4}
    index.check_integrity()


def test_removing_unknown_hashes_is_a_no_op():
    index = make_index(A)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, BlockRemoved((G[2], 12345)))
    assert index.find_matches(H) == {A: 2}
    index.check_integrity()


def test_all_cleared_drops_only_that_worker():
    index = make_index(A, B)
    index.apply_event(A, stored(H))
    index.apply_event(B, stored(H[:2]))
    index.apply_event(A, AllCleared())
    assert index.find_matches(H) == {B: 2}
    assert index.dump() == {A: [], B: [(H[1], H[0]), (H[0], None)]}
    assert index.worker_ids == [A, B]
    index.check_integrity()


def test_remove_worker_forgets_it_and_its_roots():
    index = make_index(A, B)
    index.apply_event(A, stored(H))
    index.apply_event(B, stored(H))
    index.remove_worker(A)
    assert index.find_matches(H) == {B: 4}
    assert not index.has_worker(A)
    index.remove_worker(A)  # idempotent
    index.remove_worker(B)
    assert index._root_holders == {}
    index.check_integrity()


def test_events_for_unknown_workers_are_rejected_without_changes():
    index = make_index(A)
    with pytest.raises(UnknownWorkerError):
        index.apply_event(C, stored(H))
    with pytest.raises(TypeError, match="not a KV event"):
        index.apply_event(A, "stored")  # type: ignore[arg-type]
    assert index.dump() == {A: []}
    index.check_integrity()


def test_cap_drops_least_recently_stored_tails_first():
    index = make_index(A, max_blocks_per_worker=3)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, stored(G[2:], parent=G[1]))  # refreshes nothing: G[2] is new
    index.apply_event(A, stored(H[2:3], parent=H[1]))  # 4 blocks: H[1] is the oldest
    # Stored tail first, H[1] was the oldest entry; dropping it orphans G[2] and H[2].
    assert [block_hash for block_hash, _ in index.dump()[A]] == [H[0], G[2], H[2]]
    assert index.num_capped_blocks == 1
    assert index.find_matches(H) == {A: 1}
    index.check_integrity()


def test_cap_on_one_long_run_keeps_its_head():
    index = make_index(A, max_blocks_per_worker=2)
    index.apply_event(A, stored(H))
    assert index.dump()[A] == [(H[1], H[0]), (H[0], None)]
    assert index._workers[A].num_orphans == 0
    assert index.find_matches(H) == {A: 2}
    index.check_integrity()


def test_dump_loads_back_into_an_equal_index():
    index = make_index(A, B)
    index.apply_event(A, stored(H))
    index.apply_event(A, BlockRemoved((H[1],)))
    index.apply_event(B, stored(G))
    copy = make_index(A, B)
    for worker_id, entries in index.dump().items():
        copy.replace_worker(worker_id, entries)
    assert copy.dump() == index.dump()
    assert copy._workers[A].num_orphans == 1
    for query in (H, G, H[:1]):
        assert copy.find_matches(query) == index.find_matches(query)
    copy.check_integrity()


def test_replace_worker_accepts_children_before_parents():
    index = make_index(A)
    index.replace_worker(A, [(H[2], H[1]), (H[1], H[0]), (H[0], None)])
    assert index._workers[A].num_orphans == 0
    assert index.find_matches(H) == {A: 3}
    index.check_integrity()


def test_random_event_streams_keep_invariants_and_exact_matches():
    """Random stores and removals (middle blocks included) on 3 workers; compare with a brute-force match."""
    rng = random.Random(7)
    prompts = [chain(*[rng.randrange(3) for _ in range(4 * 6)]) for _ in range(30)]
    index = make_index(A, B, C, max_blocks_per_worker=40)
    for _ in range(600):
        worker_id = rng.choice([A, B, C])
        prompt = rng.choice(prompts)
        roll = rng.random()
        if roll < 0.5:
            start = rng.randrange(len(prompt))
            end = rng.randrange(start, len(prompt)) + 1
            index.apply_event(worker_id, stored(prompt[start:end], prompt[start - 1] if start else None))
        elif roll < 0.95:
            index.apply_event(worker_id, BlockRemoved(tuple(rng.sample(prompt, 2))))
        else:
            index.apply_event(worker_id, AllCleared())
        index.check_integrity()
        query = rng.choice(prompts)
        assert index.find_matches(query) == reference_matches(index, query)


def test_media_of_a_block_pair_up_per_medium_and_the_entry_lives_while_any_holds_it():
    index = make_index(A)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, stored(H[:2], medium=HOST))  # offloaded: now on the device and in host memory
    index.apply_event(A, stored(H[1:2], H[0], medium=DISK))
    assert [index.media_mask(A, h) for h in H[:3]] == [1 | 2, 1 | 2 | 4, 0]
    index.apply_event(A, BlockRemoved(tuple(H[:2])))  # evicted from the device
    assert [index.media_mask(A, h) for h in H[:2]] == [2, 2 | 4]
    assert index.find_matches(H) == {A: 2}
    index.apply_event(A, BlockRemoved(tuple(H[:2]), HOST))
    index.apply_event(A, BlockRemoved(tuple(H[:2]), DISK))  # H[0] was never on disk: a no-op for it
    assert index.dump() == {A: []} and index.dump_media() == {A: []}
    index.check_integrity()


def test_removing_a_medium_the_block_is_not_in_changes_nothing():
    index = make_index(A)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, BlockRemoved(tuple(H[:2]), HOST))
    assert index.find_matches(H) == {A: 2} and index.dump_media() == {A: []}
    index.apply_event(A, stored(H[:1], medium=DISK))
    index.apply_event(A, BlockRemoved(tuple(H[:1]), HOST))
    assert index.media_mask(A, H[0]) == 1 | 4
    index.check_integrity()


def test_tiered_matches_split_the_leading_run_by_best_medium():
    index = make_index(A, B)
    index.apply_event(A, stored(H[:1]))
    index.apply_event(A, stored(H[:3], medium=HOST))
    index.apply_event(A, stored(H[2:4], H[1], medium=DISK))
    index.apply_event(B, stored(H[:2]))
    # A: H[0] device (and host), H[1] host, H[2] host (and disk), H[3] disk.
    assert index.find_tiered_matches(H) == {A: TierMatch(1, 2, 1), B: TierMatch(2)}
    assert index.find_tiered_matches(H)[A].credit(host_weight=0.5, disk_weight=0.25) == 1 + 2 * 0.5 + 0.25
    assert index.find_matches(H) == {A: 4, B: 2}


def test_dump_with_media_loads_back_into_an_equal_index():
    index = make_index(A)
    index.apply_event(A, stored(H[:2]))
    index.apply_event(A, stored(H[:3], medium=HOST))
    index.apply_event(A, BlockRemoved(tuple(H[:1])))
    copy = make_index(A)
    copy.replace_worker(A, index.dump()[A], index.dump_media()[A])
    assert copy.dump() == index.dump()
    assert sorted(copy.dump_media()[A]) == sorted(index.dump_media()[A]) == sorted([(H[0], 2), (H[1], 3), (H[2], 2)])
    assert copy.find_tiered_matches(H) == {A: TierMatch(1, 2, 0)}
    copy.check_integrity()


def test_random_event_streams_with_media_keep_invariants_and_exact_media():
    """Random stores and removals in three media, against a brute-force map of hash -> media."""
    rng = random.Random(11)
    prompts = [chain(*[rng.randrange(3) for _ in range(4 * 6)]) for _ in range(20)]
    index = make_index(A)
    media: dict[BlockHash, set[Medium]] = {}
    for _ in range(800):
        prompt = rng.choice(prompts)
        medium = rng.choice([DEVICE, HOST, DISK])
        if rng.random() < 0.5:
            start = rng.randrange(len(prompt))
            end = rng.randrange(start, len(prompt)) + 1
            index.apply_event(A, stored(prompt[start:end], prompt[start - 1] if start else None, medium))
            for block_hash in prompt[start:end]:
                media.setdefault(block_hash, set()).add(medium)
        else:
            removed = rng.sample(prompt, 2)
            index.apply_event(A, BlockRemoved(tuple(removed), medium))
            for block_hash in removed:
                media.get(block_hash, set()).discard(medium)
        index.check_integrity()
        for block_hash in {h for p in prompts for h in p}:
            expected = sum(m.bit for m in media.get(block_hash, ()))
            assert index.media_mask(A, block_hash) == expected
        query = rng.choice(prompts)
        assert index.find_tiered_matches(query).get(A, TierMatch(0)).num_blocks == reference_matches(index, query).get(A, 0)
