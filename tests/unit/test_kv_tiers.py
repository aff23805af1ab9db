"""Lower KV tiers without a model: the block file format, host and disk bookkeeping, the copier's ordering."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from triton_disagg.engine.tiers.block_file import (
    PAYLOAD_OFFSET,
    BlockFileHeader,
    BlockFileLayout,
    InvalidBlockFile,
    encode_header,
    file_name,
    read_block_file,
    write_block_file,
)
from triton_disagg.engine.tiers.cache import TieredKVCache
from triton_disagg.engine.tiers.copier import block_bytes_view
from triton_disagg.engine.tiers.disk import DiskTier
from triton_disagg.engine.tiers.host import HostTier
from triton_disagg.router.events import BlockRemoved, BlockStored, Medium

BLOCK_SHAPE = (2, 2, 4, 1, 8)  # (L, 2, BS, KVH, D): 128 float32, 512 bytes a block
LAYOUT = BlockFileLayout("model-a", "float32", BLOCK_SHAPE)
HOST, DISK = Medium.HOST, Medium.DISK


def make_pool(num_blocks: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((num_blocks, *BLOCK_SHAPE), generator=torch.Generator().manual_seed(seed))


def write_file(folder: Path, block_hash: int, payload: torch.Tensor, layout: BlockFileLayout = LAYOUT) -> Path:
    path = folder / file_name(block_hash)
    write_block_file(path, layout, BlockFileHeader(block_hash, None), block_bytes_view(payload.unsqueeze(0), 0))
    return path


# -- block files --------------------------------------------------------------------------


def test_block_file_round_trips(tmp_path):
    block = make_pool(1)[0]
    path = write_file(tmp_path, 0xABC, block)
    assert path.stat().st_size == PAYLOAD_OFFSET + LAYOUT.block_bytes == PAYLOAD_OFFSET + 512
    out = torch.zeros_like(block)
    read_block_file(path, LAYOUT, 0xABC, block_bytes_view(out.unsqueeze(0), 0))
    assert torch.equal(out, block)


def _flip_payload_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[PAYLOAD_OFFSET + 100] ^= 0x01
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    os.truncate(path, PAYLOAD_OFFSET + 100)


def _flip_header_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0x01
    path.write_bytes(bytes(raw))


def _other_version(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8] = 99  # the version's low byte
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, layout, block_hash, message",
    [
        (_flip_payload_byte, LAYOUT, 0xABC, "payload fails its checksum"),
        (_truncate, LAYOUT, 0xABC, "truncated"),
        (_flip_header_byte, LAYOUT, 0xABC, "header fails its checksum"),
        (_other_version, LAYOUT, 0xABC, "format version 99"),
        (None, BlockFileLayout("model-b", "float32", BLOCK_SHAPE), 0xABC, "another pool layout"),
        (None, BlockFileLayout("model-a", "bfloat16", BLOCK_SHAPE), 0xABC, "another pool layout"),
        (None, LAYOUT, 0xDEF, "holds block"),
    ],
)
def test_bad_block_files_are_refused(tmp_path, damage, layout, block_hash, message):
    path = write_file(tmp_path, 0xABC, make_pool(1)[0])
    if damage is not None:
        damage(path)
    out = torch.zeros((1, *BLOCK_SHAPE))
    with pytest.raises(InvalidBlockFile, match=message):
        read_block_file(path, layout, block_hash, block_bytes_view(out, 0))


def test_header_fits_before_the_payload():
    header = encode_header(LAYOUT, BlockFileHeader(2**64 - 1, 2**64 - 2), memoryview(b"\0" * 512))
    assert len(header) == PAYLOAD_OFFSET and header.startswith(b"TDKVBLK\0")


# -- host tier ---------------------------------------------------------------------------


def test_host_tier_evicts_least_recently_used_ready_unpinned_blocks():
    host = HostTier(3, BLOCK_SHAPE, torch.float32, pin_memory=False)
    for block_hash in (1, 2, 3):
        entry, evicted = host.reserve(block_hash, None)
        assert evicted == []
    host.mark_ready(1)
    host.mark_ready(3)
    host.touch(1)  # order, least recent first: 2 (filling), 3, 1
    pinned = host.pin(3)
    entry, evicted = host.reserve(4, 3)
    assert [h for h, _ in evicted] == [1]  # 2 is filling and 3 pinned: 1 goes, and its slot is reused
    assert entry.slot == evicted[0][1].slot
    pinned.num_readers -= 1
    host.mark_ready(2)
    host.mark_ready(4)
    assert [h for h, _ in host.entries()] == [2, 3, 4]
    host.check_integrity(expect_idle=True)


def test_host_tier_refuses_when_every_block_is_busy():
    host = HostTier(1, BLOCK_SHAPE, torch.float32, pin_memory=False)
    host.reserve(1, None)
    assert host.reserve(2, None) == (None, [])
    host.check_integrity(expect_idle=False)
    with pytest.raises(RuntimeError, match="in flight"):
        host.check_integrity(expect_idle=True)


# -- disk tier ---------------------------------------------------------------------------


def test_disk_folder_belongs_to_one_tier(tmp_path):
    first = DiskTier(tmp_path, 4, LAYOUT)
    with pytest.raises(ValueError, match="in use by another worker"):
        DiskTier(tmp_path, 4, LAYOUT)
    first.close()
    DiskTier(tmp_path, 4, LAYOUT).close()


def test_disk_tier_adopts_valid_files_and_deletes_bad_ones(tmp_path):
    pool = make_pool(4)
    for block_hash in (1, 2, 3):
        path = write_file(tmp_path, block_hash, pool[block_hash])
        os.utime(path, ns=(block_hash * 10**9, block_hash * 10**9))  # 1 oldest
    write_file(tmp_path, 4, pool[0], BlockFileLayout("other-model", "float32", BLOCK_SHAPE))
    (tmp_path / file_name(5)).write_bytes(b"TDKVBLK\0garbage")
    (tmp_path / "notes.txt").write_text("not ours")
    disk = DiskTier(tmp_path, 2, LAYOUT)  # room for two: the oldest valid file goes too
    assert [h for h, _ in disk.entries()] == [2, 3] and disk.num_invalid_at_start == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([file_name(2), file_name(3), "notes.txt", ".lock"])
    disk.check_integrity(expect_idle=True)
    disk.close()


# -- the tiered cache, on a pool without a model ---------------------------------------------


def make_cache(tmp_path=None, pool_blocks: int = 8, host_blocks: int = 4, disk_blocks: int = 0, **overrides) -> TieredKVCache:
    return TieredKVCache(make_pool(pool_blocks), host_blocks, LAYOUT, disk_folder=tmp_path, disk_blocks=disk_blocks, **overrides)


def offload(cache: TieredKVCache, blocks: dict[int, tuple[int, int | None]]) -> None:
    """Free device blocks {block_id: (hash, parent)} and flush, as the engine does after a step."""
    for block_id, (block_hash, parent) in blocks.items():
        cache.block_freed(block_id, block_hash, parent)
    cache.flush()


def test_freed_blocks_are_copied_to_host_memory_and_announced_as_one_run():
    cache = make_cache()
    # Freed tail first, as a sequence frees them: blocks 2, 1, 0 hold hashes 12, 11, 10.
    offload(cache, {2: (12, 11), 1: (11, 10), 0: (10, None)})
    cache.wait_idle()
    assert cache.drain_events() == [BlockStored((10, 11, 12), None, (), 4, HOST)]
    for block_id, block_hash in ((0, 10), (1, 11), (2, 12)):
        assert torch.equal(cache.host.pool[cache.host.ready(block_hash).slot], cache.device_pool[block_id])
    assert cache.stats.offloaded_blocks["host"] == 3 and cache.stats.bytes_in["host"] == 3 * 512
    cache.check_integrity(expect_idle=True)
    cache.close()


def test_reusing_a_block_waits_for_its_offload(gated_mover):
    cache = make_cache(mover=gated_mover)
    original = cache.device_pool[3].clone()
    cache.copier.mover.gate.clear()
    offload(cache, {3: (30, None)})
    waited = threading.Event()

    def reuse() -> None:
        cache.before_reuse(3)
        waited.set()

    thread = threading.Thread(target=reuse)
    thread.start()
    assert not waited.wait(0.2)  # the copy is held: the slot must not be handed out
    cache.copier.mover.gate.set()
    assert waited.wait(10)
    thread.join()
    cache.device_pool[3].zero_()  # now rewriting it is safe: host memory has the original
    assert torch.equal(cache.host.pool[cache.host.ready(30).slot], original)
    cache.close()


def test_a_block_freed_and_reused_before_the_flush_is_not_offloaded():
    cache = make_cache()
    cache.block_freed(1, 11, None)
    cache.before_reuse(1)
    cache.flush()
    cache.wait_idle()
    assert cache.host.num_resident == 0 and cache.drain_events() == []
    cache.close()


def test_host_evictions_reach_disk_only_for_blocks_used_twice(tmp_path):
    cache = make_cache(tmp_path, host_blocks=2, disk_blocks=4)
    offload(cache, {0: (10, None), 1: (11, 10)})
    cache.block_freed(0, 10, None)  # block 10 used a second time (already in host memory: only touched)
    cache.wait_idle()
    offload(cache, {2: (20, None), 3: (21, 20)})  # evicts 10 and 11 from host memory
    cache.wait_idle()
    events = cache.drain_events()
    assert BlockRemoved((11,), HOST) in events and BlockRemoved((10,), HOST) in events
    assert BlockStored((10,), None, (), 4, DISK) in events
    assert [h for h, _ in cache.disk.entries()] == [10]  # 11 was seen once: never written
    assert cache.stats.not_admitted_blocks == 1 and cache.stats.offloaded_blocks["disk"] == 1
    cache.check_integrity(expect_idle=True)
    cache.close()


def test_a_slow_disk_never_holds_up_an_offload(tmp_path, gated_mover):
    cache = make_cache(tmp_path, host_blocks=1, disk_blocks=4, disk_min_uses=1, mover=gated_mover)
    offload(cache, {0: (10, None)})
    cache.wait_idle()
    gated_mover.disk_gate.clear()
    offload(cache, {1: (11, None)})  # evicts 10 from host memory: its file write is held
    reuse = threading.Thread(target=cache.before_reuse, args=(1,))
    reuse.start()
    reuse.join(5)
    assert not reuse.is_alive()  # block 1's copy to host memory did not wait for the disk
    assert (cache.find(10), cache.find(11)) == (None, HOST)  # 10 is on its way to disk, not readable yet
    gated_mover.disk_gate.set()
    cache.wait_idle()
    assert cache.find(10) is DISK
    assert torch.equal(cache.host.pool[cache.host.ready(11).slot], cache.device_pool[1])
    cache.check_integrity(expect_idle=True)
    cache.close()


def test_onboarding_copies_back_from_both_tiers_and_stops_at_a_corrupt_file(tmp_path):
    cache = make_cache(tmp_path, host_blocks=1, disk_blocks=4)
    expected = cache.device_pool.clone()
    offload(cache, {0: (10, None)})
    cache.block_freed(0, 10, None)
    cache.wait_idle()
    offload(cache, {1: (11, 10)})  # pushes 10 (used twice) to disk
    cache.wait_idle()
    assert (cache.find(10), cache.find(11), cache.find(12)) == (DISK, HOST, None)
    cache.drain_events()
    ticket = cache.start_onboard("r", [10, 11], [DISK, HOST], [5, 6])
    cache.wait_idle()
    assert cache.poll() == [ticket] and ticket.num_ready == 2
    assert torch.equal(cache.device_pool[5], expected[0]) and torch.equal(cache.device_pool[6], expected[1])
    assert cache.stats.onboarded_blocks == {"host": 1, "disk": 1}

    _flip_payload_byte(cache.disk.path_of(10))
    ticket = cache.start_onboard("r2", [10, 11], [DISK, HOST], [5, 6])
    cache.wait_idle()
    assert cache.poll() == [ticket] and ticket.num_ready == 0  # the run ends at the bad file
    assert cache.drain_events() == [BlockRemoved((10,), DISK)]
    assert cache.find(10) is None and not cache.disk.path_of(10).exists()
    assert cache.stats.invalid_blocks == 1
    cache.check_integrity(expect_idle=True)
    cache.close()


def test_blocks_read_by_an_onboarding_are_not_evicted_under_it(gated_mover):
    cache = make_cache(host_blocks=1, mover=gated_mover)
    offload(cache, {0: (10, None)})
    cache.wait_idle()
    cache.copier.mover.gate.clear()
    ticket = cache.start_onboard("r", [10], [HOST], [5])
    offload(cache, {1: (11, None)})  # host memory is full and 10 is pinned: 11 is not offloaded
    cache.copier.mover.gate.set()
    cache.wait_idle()
    assert cache.poll() == [ticket] and ticket.num_ready == 1
    assert cache.stats.skipped_offloads == 1 and cache.find(10) is HOST and cache.find(11) is None
    cache.check_integrity(expect_idle=True)
    cache.close()


def test_a_restarted_cache_announces_the_disk_blocks_it_adopts(tmp_path):
    first = make_cache(tmp_path, host_blocks=1, disk_blocks=4, disk_min_uses=1)
    offload(first, {0: (10, None)})
    first.wait_idle()
    offload(first, {1: (11, 10)})
    first.wait_idle()
    first.close()
    second = make_cache(tmp_path, host_blocks=1, disk_blocks=4)
    assert second.drain_events() == [BlockStored((10,), None, (), 4, DISK)]
    assert second.find(10) is DISK
    second.close()
