"""The pure parts of surviving a worker failure: routability, continuation of a request, the KV directory."""

from __future__ import annotations

import threading

import pytest

from triton_disagg.errors import ServiceUnavailable, is_unavailable_message
from triton_disagg.kv_transfer.directory import KVDirectory
from triton_disagg.launch.supervisor import models_missing_a_stub
from triton_disagg.kv_transfer.layout import PoolLayout
from triton_disagg.router.events import WorkerId
from triton_disagg.router.health import WorkerHealth
from triton_disagg.router.subscriber import StreamState, StreamStatus
from triton_disagg.serving.watched_stream import watched_stream
from triton_disagg.serving.migration import WorkerLost, lost_worker_reason, plan_continuation

A, B = WorkerId("decode_0"), WorkerId("decode_1")


def status(epoch: int = 7, is_dropped: bool = False, state: StreamState = StreamState.SYNCED) -> StreamStatus:
    return StreamStatus(state=state, epoch=epoch, seq=3, num_buffered=0, is_dropped=is_dropped)


def test_a_reported_worker_is_excluded_until_its_stream_shows_a_new_epoch():
    health = WorkerHealth()
    health.mark_failed(A, status(epoch=7))
    assert health.routable([A, B], lambda w: status(epoch=7)) == [B]
    # Reloaded: its new publisher resynchronised under epoch 9.
    assert health.routable([A, B], lambda w: status(epoch=9)) == [A, B]
    assert health.failed_worker_ids == []


def test_a_silent_worker_is_excluded_while_it_stays_silent():
    health = WorkerHealth()
    assert health.routable([A, B], lambda w: status(is_dropped=w == A)) == [B]
    assert health.routable([A, B], lambda w: status()) == [A, B]


def test_without_an_event_stream_a_report_holds_until_the_worker_leaves():
    health = WorkerHealth()
    health.mark_failed(A, None)
    assert not health.is_routable(A, None)
    assert not health.is_routable(A, status(epoch=-1, state=StreamState.RESYNCING))
    health.forget(A)
    assert health.is_routable(A, None)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("Stub process 'decode_0_0_0' is not healthy.", "dead"),
        ("Request for unknown model: 'decode_1' is not found", "gone"),
        ("Request for unknown model: 'decode_1' has no available versions", "gone"),
        ("RuntimeError: the engine is shutting down", "gone"),
        ("max_tokens must be an integer >= 1, got 0", None),
        ("prompt token id 99999 is outside the vocabulary [0, 259)", None),
    ],
)
def test_lost_worker_reason(message, reason):
    assert lost_worker_reason(message) == reason


def test_a_continuation_carries_the_streamed_tokens_and_asks_for_the_rest():
    lost = WorkerLost("decode_0", "dead", "stub gone")
    continuation = plan_continuation([1, 2, 3], [10, 11], max_tokens=5, num_migrations=0, migration_limit=3, lost=lost)
    assert (continuation.prompt_token_ids, continuation.max_tokens, continuation.migration) == ([1, 2, 3, 10, 11], 3, 1)


def test_past_the_migration_limit_the_request_is_unavailable():
    lost = WorkerLost("decode_0", "dead", "stub gone")
    with pytest.raises(ServiceUnavailable) as raised:
        plan_continuation([1], [2], max_tokens=4, num_migrations=2, migration_limit=2, lost=lost)
    assert raised.value.reason == "migration_limit"
    assert is_unavailable_message(str(raised.value))
    with pytest.raises(ServiceUnavailable):
        plan_continuation([1], [], max_tokens=4, num_migrations=0, migration_limit=0, lost=lost)  # 0: off


def test_unavailable_messages_are_recognisable_by_their_text():
    error = ServiceUnavailable("no_workers", "no decode worker is loaded yet")
    assert str(error) == "unavailable (no_workers): no decode worker is loaded yet"
    assert is_unavailable_message(str(error))
    assert not is_unavailable_message("max_tokens (5) is above this server's limit of 4")


def layout(agent_name: str, model_name: str) -> PoolLayout:
    return PoolLayout(
        agent_name=agent_name, mem_type="DRAM", device_id=0, base_addr=4096, num_blocks=4, block_bytes=64,
        block_shape=(1, 2, 4, 1, 2), dtype="float32", model_name=model_name,
    )  # fmt: skip


def test_the_kv_directory_keeps_one_life_per_worker_and_drops_unloaded_ones():
    directory = KVDirectory()
    directory.register(layout("decode_0-aaaa", "decode_0"), b"meta")
    directory.register(layout("prefill_0-bbbb", "prefill_0"), b"meta")
    directory.register(layout("decode_0-cccc", "decode_0"), b"meta")  # reloaded: a new agent
    assert directory.agent_names() == ["decode_0-cccc", "prefill_0-bbbb"]
    assert directory.retain_models({"decode_0", "llm"}) == ["prefill_0-bbbb"]
    assert directory.forget_model("decode_0") == ["decode_0-cccc"]
    assert directory.agent_names() == []


def test_a_watched_stream_yields_converted_responses_in_order():
    stream = watched_stream("decode_0", lambda: iter([1, 2, 3]), lambda r: r * 10, lambda: pytest.fail("no probe"), 5.0)
    assert list(stream) == [10, 20, 30]


class _GatedStream:
    """A stream whose responses are all queued before the reader takes the first: the reader is behind."""

    def __init__(self, responses: list) -> None:
        self.responses = responses
        self.all_queued = threading.Event()

    def __iter__(self):
        yield from self.responses
        self.all_queued.set()


def _merge_until_negative(earlier: list[int], later: list[int]) -> list[int] | None:
    return None if later[0] < 0 else earlier + later


def test_a_reader_that_fell_behind_takes_what_queued_as_one_item_up_to_one_that_does_not_merge():
    gated = _GatedStream([[1], [2], [3], [-1], [4]])

    def start():
        return gated

    stream = watched_stream("decode_0", start, list, lambda: None, 5.0, merge=_merge_until_negative)
    first = next(stream)  # taken as soon as it came: alone, or with what queued behind it
    assert gated.all_queued.wait(5)
    rest = list(stream)  # all queued now: what is left of [1, 2, 3] as one item, then [-1, 4]
    assert first + sum(rest, []) == [1, 2, 3, -1, 4]
    assert rest[-1] == [-1, 4] and len(rest) == (1 if first == [1, 2, 3] else 2)


def test_without_merge_every_response_is_its_own_item():
    stream = watched_stream("decode_0", lambda: iter([[1], [2]]), list, lambda: None, 5.0)
    assert list(stream) == [[1], [2]]


class _SilentStream:
    """A dead stub's stream: one response, then neither a response nor an end until cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def __iter__(self):
        yield "first"
        self.cancelled.wait()

    def cancel(self) -> None:
        self.cancelled.set()


def test_a_watched_stream_that_goes_silent_is_probed_given_up_and_cancelled_when_the_probe_fails():
    silent = _SilentStream()
    probes = []
    answers = iter([None, "dead"])  # alive at the first probe, dead at the second

    def probe():
        probes.append(1)
        return next(answers)

    stream = watched_stream("decode_0", lambda: silent, str.upper, probe, probe_after_s=0.01)
    assert next(stream) == "FIRST"
    with pytest.raises(WorkerLost) as raised:
        next(stream)
    assert (raised.value.worker_name, raised.value.reason, len(probes)) == ("decode_0", "dead", 2)
    assert silent.cancelled.is_set()  # its reading thread is not left blocked


def test_a_watched_stream_passes_on_what_opening_it_raised():
    def start():
        raise RuntimeError("Request for unknown model: 'decode_9' is not found")

    with pytest.raises(RuntimeError, match="decode_9"):
        list(watched_stream("decode_9", start, str, lambda: None, 5.0))


def test_models_missing_a_stub():
    instances = {"llm": 2, "router": 1, "decode_0": 1, "decode_1": 1}
    live = {10: "llm", 11: "router", 12: "decode_0", 13: "decode_1", 14: "kv_transfer"}
    assert models_missing_a_stub(instances, live) == ["llm"]
    assert models_missing_a_stub(instances, {**live, 15: "llm"}) == []
    assert models_missing_a_stub(instances, {}) == ["decode_0", "decode_1", "llm", "router"]
