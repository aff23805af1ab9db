"""Block hashes stable across processes; the msgpack wire format round-trips and rejects malformed input."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from triton_disagg.router.events import (
    AllCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    MalformedEventError,
    Medium,
    WorkerDump,
    WorkerId,
    decode_batch,
    decode_dump,
    decode_dump_request,
    encode_batch,
    encode_dump,
    encode_dump_request,
)
from triton_disagg.router.hashing import ROOT_HASH, hash_block_tokens, hash_request_tokens

W = WorkerId("prefill_0")


def test_hashes_are_the_same_in_another_process_and_pinned():
    code = (
        "from triton_disagg.router.hashing import hash_request_tokens;"
        "print(hash_request_tokens(list(range(10)), 4), hash_request_tokens([1, 2, 3, 4], 4, ('lora-7', 3)))"
    )
    # A different hash seed in the child would change Python's built-in hash(); ours must not move.
    env = {"PYTHONHASHSEED": "12345", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    here = f"{hash_request_tokens(list(range(10)), 4)} {hash_request_tokens([1, 2, 3, 4], 4, ('lora-7', 3))}"
    assert out.stdout.strip() == here
    # Pinned: the blake2b layout is a contract between engine and router versions.
    assert hash_request_tokens([1, 2, 3, 4], 4) == [hash_block_tokens(None, [1, 2, 3, 4])]
    assert hash_block_tokens(None, [1, 2, 3, 4]) == 13832205103575190436


def test_hashes_chain_and_extra_keys_split_the_space():
    plain = hash_request_tokens(list(range(8)), 4)
    assert plain[1] == hash_block_tokens(plain[0], [4, 5, 6, 7])
    assert hash_request_tokens(list(range(8)), 4, ("lora", 1)) != plain
    assert hash_request_tokens(list(range(8)), 4, parent_hash=ROOT_HASH) == plain
    assert hash_request_tokens(list(range(7)), 4) == plain[:1]  # a partial block has no hash
    assert hash_request_tokens(list(range(8)), 2)[1] != plain[0]  # block size changes every hash


EVENTS = (
    BlockStored((1, 2, 3), None, tuple(range(12)), 4),
    BlockStored((2**64 - 1,), 3, (), 4),
    BlockRemoved((2, 3)),
    AllCleared(),
    BlockStored((2, 3), 1, (), 4, Medium.HOST),
    BlockStored((3,), 2, (), 4, Medium.DISK),
    BlockRemoved((3,), Medium.HOST),
)


def test_batch_round_trips():
    batch = EventBatch(W, 17, 42, EVENTS)
    assert decode_batch(encode_batch(batch)) == batch


def test_token_ids_can_be_left_off_the_wire():
    batch = decode_batch(encode_batch(EventBatch(W, 1, 1, EVENTS[:1]), include_token_ids=False))
    assert batch.events == (BlockStored((1, 2, 3), None, (), 4),)


def test_dump_and_dump_request_round_trip():
    dump = WorkerDump(W, 5, 9, ((11, None), (12, 11), (2**64 - 1, 12)), ((12, 3), (2**64 - 1, 4)))
    assert decode_dump(encode_dump(dump)) == dump
    assert decode_dump_request(encode_dump_request(W)) == W


def test_version_1_payloads_still_decode_with_every_block_on_the_device():
    batch = decode_batch(msgpack.packb([1, "prefill_0", 1, 1, [[0, [1, 2], None, [], 4], [1, [2]]]]))
    assert batch.events == (BlockStored((1, 2), None, (), 4), BlockRemoved((2,)))
    assert batch.events[0].medium is Medium.DEVICE and batch.events[1].medium is Medium.DEVICE
    dump = decode_dump(msgpack.packb([1, "prefill_0", 1, 1, [11], [None]]))
    assert dump == WorkerDump(W, 1, 1, ((11, None),))
    assert decode_dump_request(msgpack.packb([1, "dump", "prefill_0"])) == W


def _batch(events: list, version: int = 1) -> bytes:
    return msgpack.packb([version, "prefill_0", 1, 1, events])


@pytest.mark.parametrize(
    "payload, worker_id",
    [
        (b"\xc1", None),  # never used byte
        (b"", None),
        (msgpack.packb({"a": 1}), None),
        (msgpack.packb([3, "prefill_0", 1, 1, []]), None),  # other wire version
        (msgpack.packb([True, "prefill_0", 1, 1, []]), None),
        (msgpack.packb([1, "", 1, 1, []]), None),
        (msgpack.packb([1, "prefill_0", -1, 1, []]), None),
        (msgpack.packb([1, "prefill_0", 1, 1.5, []]), None),
        (msgpack.packb([1, "prefill_0", 1, 1, []]) + b"\x00", None),  # trailing bytes
        (_batch([[0, [], None, [], 4]]), W),  # no blocks
        (_batch([[0, [1, -2], None, [], 4]]), W),  # negative hash
        (_batch([[0, [1.0], None, [], 4]]), W),
        (_batch([[0, ["x"], None, [], 4]]), W),
        (_batch([[0, [1, 2], 2, [], 4]]), W),  # its own parent
        (_batch([[0, [1], -1, [], 4]]), W),
        (_batch([[0, [1], None, [1, 2, 3], 4]]), W),  # 3 tokens for one 4-token block
        (_batch([[0, [1], None, [0, 0, 0, -1], 4]]), W),
        (_batch([[0, [1], None, [], 0]]), W),
        (_batch([[1, []]]), W),
        (_batch([[1, [1], 2]]), W),
        (_batch([[2, 1]]), W),
        (_batch([[9]]), W),
        (_batch([[True, [1]]]), W),  # a boolean is not a tag
        (_batch([[]]), W),
        (_batch({"events": 1}), W),
        (_batch([[0, [1], None, [], 4]], version=2), W),  # version 2 carries the medium
        (_batch([[0, [1], None, [], 4, "gpu"]], version=2), W),
        (_batch([[0, [1], None, [], 4, 1]], version=2), W),
        (_batch([[1, [1]]], version=2), W),
        (_batch([[1, [1], None]], version=2), W),
    ],
)
def test_malformed_batches_are_rejected_naming_the_worker_when_known(payload, worker_id):
    with pytest.raises(MalformedEventError) as info:
        decode_batch(payload)
    assert info.value.worker_id == worker_id


@pytest.mark.parametrize(
    "payload",
    [
        msgpack.packb([1, "w", 1, 1, [1, 2], [None]]),  # lengths differ
        msgpack.packb([1, "w", 1, 1, [1], [-1]]),
        msgpack.packb([1, "w", 1, 1, [1.5], [None]]),
        msgpack.packb([1, "w", 1]),
        msgpack.packb([2, "w", 1, 1, [1], [None]]),  # version 2 carries the media list
        msgpack.packb([2, "w", 1, 1, [1], [None], [[1, 8]]]),  # mask outside 1..7
        msgpack.packb([2, "w", 1, 1, [1], [None], [[1]]]),
        msgpack.packb([2, "w", 1, 1, [1], [None], [[-1, 2]]]),
    ],
)
def test_malformed_dumps_are_rejected(payload):
    with pytest.raises(MalformedEventError):
        decode_dump(payload)


@pytest.mark.parametrize("payload", [b"", msgpack.packb([1, "dump", ""]), msgpack.packb([1, "dumps", "w"])])
def test_malformed_dump_requests_are_rejected(payload):
    with pytest.raises(MalformedEventError):
        decode_dump_request(payload)
