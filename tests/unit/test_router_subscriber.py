"""KV event streams: ordering, gap detection and resync from dumps, liveness; and a real ZeroMQ round trip."""

from __future__ import annotations

import logging

import pytest

from triton_disagg.router.config import PublisherConfig, SubscriberConfig
from triton_disagg.router.events import (
    BlockRemoved,
    BlockStored,
    Medium,
    EventBatch,
    MalformedEventError,
    WorkerDump,
    WorkerId,
    decode_dump,
)
from triton_disagg.router.hashing import BlockHash, hash_request_tokens
from triton_disagg.router.index import PrefixIndex
from triton_disagg.router.publisher import KVEventPublisher
from triton_disagg.router.subscriber import EventStreams, KVEventSubscriber, StreamState, StreamStatus

A, B = WorkerId("a"), WorkerId("b")
H = hash_request_tokens(list(range(16)), 4)  # 4 blocks
EPOCH = 100


def make_streams(*workers: WorkerId, **overrides) -> EventStreams:
    config = SubscriberConfig(**({"dump_timeout_s": 1.0, "max_dump_attempts": 2, "silence_timeout_s": 5.0} | overrides))
    streams = EventStreams(PrefixIndex(), config)
    for worker_id in workers:
        streams.add_worker(worker_id, now_s=0.0)
    return streams


def synced(*workers: WorkerId, **overrides) -> EventStreams:
    """Streams in sync at seq 0 after an empty dump."""
    streams = make_streams(*workers, **overrides)
    for worker_id in workers:
        assert streams.on_dump(WorkerDump(worker_id, EPOCH, 0, ()), 0.0) == "resynced"
    return streams


def batch(worker_id: WorkerId, seq: int, *events, epoch: int = EPOCH) -> EventBatch:
    return EventBatch(worker_id, epoch, seq, tuple(events))


def stored(hashes: list[BlockHash], parent: BlockHash | None = None) -> BlockStored:
    return BlockStored(tuple(hashes), parent, (), 4)


def test_new_worker_asks_for_a_dump_and_buffers_until_it_comes():
    streams = make_streams(A)
    assert streams.due_dump_requests(0.0) == [A]
    assert streams.due_dump_requests(0.5) == []  # requested, not timed out
    assert streams.on_batch(batch(A, 3, stored(H[2:3], H[1])), 0.6) == "buffered"
    assert streams.on_batch(batch(A, 4, BlockRemoved((H[0],))), 0.7) == "buffered"
    # The dump includes batches up to seq 3: batch 3 is skipped, batch 4 applied.
    dump = WorkerDump(A, EPOCH, 3, ((H[0], None), (H[1], H[0]), (H[2], H[1])))
    assert streams.on_dump(dump, 0.8) == "resynced"
    assert streams.status(A) == StreamStatus(StreamState.SYNCED, EPOCH, 4, 0, False)
    assert streams.index.dump() == {A: [(H[1], H[0]), (H[2], H[1])]}
    assert streams.counts == {"buffered": 2, "resynced": 1, "applied": 1}


def test_in_order_batches_apply_and_heartbeats_only_prove_liveness():
    streams = synced(A)
    assert streams.on_batch(batch(A, 1, stored(H[:2])), 1.0) == "applied"
    assert streams.on_batch(batch(A, 1), 2.0) == "heartbeat"
    assert streams.on_batch(batch(A, 2, stored(H[2:], H[1])), 3.0) == "applied"
    assert streams.index.find_matches(H) == {A: 4}
    assert streams.status(A).seq == 2


def test_duplicate_and_out_of_order_batches_are_dropped_with_a_log_line(caplog):
    streams = synced(A)
    streams.on_batch(batch(A, 1, stored(H[:2])), 1.0)
    streams.on_batch(batch(A, 2, BlockRemoved((H[1],))), 1.0)
    with caplog.at_level(logging.WARNING, logger="triton_disagg.router.subscriber"):
        assert streams.on_batch(batch(A, 1, stored(H[:2])), 1.1) == "stale"  # late duplicate
    assert "dropped out-of-order batch seq 1 (at 2)" in caplog.text
    assert streams.index.find_matches(H) == {A: 1}  # not re-stored
    assert streams.on_batch(batch(A, 2, stored(H[:4]), epoch=EPOCH - 1), 1.2) == "stale"  # older publisher


def test_gap_triggers_resync_and_later_batches_replay_after_the_dump(caplog):
    streams = synced(A, B)
    streams.on_batch(batch(A, 1, stored(H[:1])), 1.0)
    streams.on_batch(batch(B, 1, stored(H[:4])), 1.0)
    with caplog.at_level(logging.WARNING, logger="triton_disagg.router.subscriber"):
        assert streams.on_batch(batch(A, 3, stored(H[2:3], H[1])), 1.1) == "gap"  # seq 2 lost
    assert "gap in KV events (seq 3 after 1)" in caplog.text
    assert streams.due_dump_requests(1.1) == [A]
    assert streams.on_batch(batch(A, 4, stored(H[3:], H[2])), 1.2) == "buffered"
    assert streams.index.find_matches(H) == {A: 1, B: 4}  # A's old entries serve until the dump
    dump = WorkerDump(A, EPOCH, 3, ((H[0], None), (H[1], H[0]), (H[2], H[1])))
    assert streams.on_dump(dump, 1.3) == "resynced"
    assert streams.index.find_matches(H) == {A: 4, B: 4}
    assert streams.status(A) == StreamStatus(StreamState.SYNCED, EPOCH, 4, 0, False)
    streams.index.check_integrity()


def test_a_heartbeat_past_the_last_seq_reveals_a_lost_batch():
    streams = synced(A)
    assert streams.on_batch(batch(A, 1), 1.0) == "gap"
    assert streams.status(A).state is StreamState.RESYNCING


def test_publisher_restart_resyncs():
    streams = synced(A)
    streams.on_batch(batch(A, 1, stored(H)), 1.0)
    assert streams.on_batch(batch(A, 1, epoch=EPOCH + 1), 2.0) == "restarted"
    assert streams.on_dump(WorkerDump(A, EPOCH + 1, 1, ()), 2.1) == "resynced"
    assert streams.index.find_matches(H) == {}


def test_unsolicited_dump_is_ignored():
    streams = synced(A)
    streams.on_batch(batch(A, 1, stored(H)), 1.0)
    assert streams.on_dump(WorkerDump(A, EPOCH, 0, ()), 1.1) == "unsolicited"
    assert streams.index.find_matches(H) == {A: 4}


def test_unknown_workers_are_rejected_with_a_log_line(caplog):
    streams = synced(A)
    with caplog.at_level(logging.WARNING, logger="triton_disagg.router.subscriber"):
        assert streams.on_batch(batch(B, 1, stored(H)), 1.0) == "unknown_worker"
        assert streams.on_dump(WorkerDump(B, EPOCH, 1, ((H[0], None),)), 1.0) == "unknown_worker"
    assert "rejected KV events of unknown worker 'b'" in caplog.text
    assert streams.index.worker_ids == [A]
    assert streams.index.find_matches(H) == {}


def test_worker_removed_from_the_index_by_the_router_is_no_longer_followed():
    streams = synced(A, B)
    streams.index.remove_worker(A)  # the router saw it leave Triton's repository index
    assert streams.on_batch(batch(A, 1, stored(H)), 1.0) == "unknown_worker"
    assert streams.check_liveness(100.0) == [B]
    assert streams.due_dump_requests(100.0) == [B]
    assert streams.index.worker_ids == [B]
    with pytest.raises(KeyError):
        streams.status(A)


def test_malformed_batch_resyncs_its_worker_and_anonymous_garbage_is_dropped():
    streams = synced(A)
    assert streams.on_malformed(MalformedEventError("bad", A), 1.0) == "resync"
    assert streams.status(A).state is StreamState.RESYNCING
    assert streams.on_malformed(MalformedEventError("bad"), 1.0) == "dropped"
    assert streams.on_malformed(MalformedEventError("bad", B), 1.0) == "dropped"


def test_unanswered_dumps_drop_the_worker_from_the_index_until_it_answers():
    streams = make_streams(A, max_dump_attempts=2)
    assert streams.due_dump_requests(0.0) == [A]  # attempt 1
    streams.on_dump(WorkerDump(A, EPOCH, 1, ((H[0], None),)), 0.1)
    assert streams.on_batch(batch(A, 3), 0.2) == "gap"
    assert streams.due_dump_requests(0.2) == [A]  # attempt 1
    assert streams.due_dump_requests(1.2) == [A]  # timed out: attempt 2
    assert streams.index.find_matches(H) == {A: 1}
    assert streams.due_dump_requests(2.2) == [A]  # 2 unanswered: dropped, asked again
    assert streams.status(A).is_dropped
    assert streams.index.find_matches(H) == {}
    assert streams.counts["unresponsive"] == 1
    streams.on_dump(WorkerDump(A, EPOCH, 3, ((H[0], None),)), 2.5)
    assert streams.status(A) == StreamStatus(StreamState.SYNCED, EPOCH, 3, 0, False)
    assert streams.index.find_matches(H) == {A: 1}


def test_silent_worker_is_dropped_and_resynced():
    streams = synced(A, B, silence_timeout_s=5.0)
    streams.on_batch(batch(A, 1, stored(H)), 1.0)
    streams.on_batch(batch(B, 1, stored(H)), 4.0)
    assert streams.check_liveness(5.9) == []
    assert streams.check_liveness(6.0) == [A]
    assert streams.index.find_matches(H) == {B: 4}
    assert streams.status(A).state is StreamState.RESYNCING
    assert streams.due_dump_requests(6.0) == [A]


def test_buffer_is_bounded_and_the_hole_it_leaves_resyncs_again():
    streams = make_streams(A, max_buffered_batches=2)
    for seq in (1, 2, 3):
        streams.on_batch(batch(A, seq, stored(H[seq - 1 : seq], H[seq - 2] if seq > 1 else None)), 0.1)
    assert streams.status(A).num_buffered == 2
    assert streams.counts["buffer_overflow"] == 1
    assert streams.on_dump(WorkerDump(A, EPOCH, 0, ()), 0.2) == "resynced"
    # Batch 1 was dropped: batch 2 is a gap after the dump at seq 0.
    assert streams.status(A).state is StreamState.RESYNCING
    assert streams.index.find_matches(H) == {}


def test_publisher_and_subscriber_over_zeromq(tmp_path):
    """A real PUB/SUB + REQ/REP round trip: late join resyncs from the dump, then events stream."""
    config = PublisherConfig(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/dump", heartbeat_interval_s=0.05)
    index = PrefixIndex()
    with KVEventPublisher(A, config) as publisher, KVEventSubscriber(
        index, SubscriberConfig(poll_interval_s=0.01, dump_timeout_s=0.5)
    ) as subscriber:
        # Before the router listens: only the dump has them, H[0] in host memory too.
        assert publisher.publish([stored(H[:2]), BlockStored((H[0],), None, (), 4, Medium.HOST)]) == 1
        assert publisher.publish([]) == 1
        subscriber.add_worker(A, publisher.events_endpoint, publisher.dump_endpoint)
        assert subscriber.wait_until(lambda s: A in s.index.worker_ids and s.status(A).state is StreamState.SYNCED, 10)
        publisher.publish([stored(H[2:], H[1])])
        publisher.publish([BlockRemoved((H[3],))])
        assert subscriber.wait_until(lambda s: s.status(A).seq == 3, 10)
        with subscriber.lock:
            assert index.find_matches(H) == {A: 3}
            assert index.dump() == {A: [(H[1], H[0]), (H[0], None), (H[2], H[1])]}
            assert index.media_mask(A, H[0]) == Medium.DEVICE.bit | Medium.HOST.bit
        dump = decode_dump(_request_dump(publisher))
        assert dump.entries == ((H[1], H[0]), (H[0], None), (H[2], H[1]))
        assert dump.media == ((H[0], Medium.DEVICE.bit | Medium.HOST.bit),)
        subscriber.remove_worker(A)
        assert subscriber.wait_until(lambda s: A not in s.index.worker_ids, 10)


def _request_dump(publisher: KVEventPublisher) -> bytes:
    import zmq

    from triton_disagg.router.events import encode_dump_request

    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.connect(publisher.dump_endpoint)
    socket.send(encode_dump_request(A))
    assert socket.poll(5000)
    reply = socket.recv()
    socket.close(linger=0)
    return reply


def test_publisher_with_a_dump_callback_reports_the_seq_read_before_it(tmp_path):
    config = PublisherConfig(f"ipc://{tmp_path}/events", f"ipc://{tmp_path}/dump")
    with KVEventPublisher(A, config, dump_fn=lambda: [(H[0], None)]) as publisher:
        publisher.publish([stored(H[:1])])
        assert publisher.dump() == WorkerDump(A, publisher.epoch, 1, ((H[0], None),))


def test_publisher_rejects_bad_settings():
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        PublisherConfig("ipc:///tmp/x", "ipc:///tmp/y", heartbeat_interval_s=0)
