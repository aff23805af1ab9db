"""CoalescingSender: one thread sends many streams' payloads, merging what a stream queues while it is busy."""

from __future__ import annotations

import threading

from triton_disagg.serving.coalescing_sender import CoalescingSender

TIMEOUT_S = 30  # only bounds a hang


class Recorder:
    """A send callback that records (stream, payload, is_final), and can be held at the next send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int], bool]] = []
        self.errors: list[tuple[str, str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_for: set[str] = set()
        self.done = threading.Condition()

    def send(self, key, payload, is_final) -> None:
        self.entered.set()
        assert self.hold.wait(TIMEOUT_S)
        if key in self.fail_for:
            raise ConnectionError(f"{key} is gone")
        with self.done:
            self.sent.append((key, payload, is_final))
            self.done.notify_all()

    def on_error(self, key, exc) -> None:
        with self.done:
            self.errors.append((key, str(exc)))
            self.done.notify_all()

    def wait_for(self, predicate) -> None:
        with self.done:
            assert self.done.wait_for(predicate, TIMEOUT_S)


def make_sender(recorder: Recorder) -> CoalescingSender:
    return CoalescingSender("test-sender", recorder.send, lambda a, b: a + b, recorder.on_error)


def test_an_idle_sender_sends_each_payload_as_it_comes():
    recorder = Recorder()
    sender = make_sender(recorder)
    for i in range(3):
        sender.push("a", [i])
        recorder.wait_for(lambda: len(recorder.sent) == i + 1)
    sender.push("a", [3], is_final=True)
    sender.close()
    assert recorder.sent == [("a", [0], False), ("a", [1], False), ("a", [2], False), ("a", [3], True)]


def test_payloads_queued_while_busy_are_merged_per_stream_in_order():
    recorder = Recorder()
    sender = make_sender(recorder)
    recorder.hold.clear()
    sender.push("a", [0])
    assert recorder.entered.wait(TIMEOUT_S)  # the thread is inside send("a", [0]) and held there
    for token in (1, 2, 3):
        sender.push("a", [token])
    sender.push("b", [10])
    sender.push("b", [11], is_final=True)
    sender.push("a", [4], is_final=True)
    recorder.hold.set()
    sender.close()
    assert recorder.sent == [("a", [0], False), ("a", [1, 2, 3, 4], True), ("b", [10, 11], True)]


def test_a_failed_send_reports_once_and_drops_the_rest_of_that_stream_only():
    recorder = Recorder()
    recorder.fail_for.add("gone")
    sender = make_sender(recorder)
    sender.push("gone", [0])
    recorder.wait_for(lambda: recorder.errors)
    sender.push("gone", [1])  # dropped: the stream failed
    sender.push("ok", [5], is_final=True)
    sender.push("gone", [2], is_final=True)  # dropped too; the stream is forgotten after its final payload
    recorder.wait_for(lambda: recorder.sent)
    recorder.fail_for.clear()
    sender.push("gone", [7], is_final=True)  # the same key again: a new stream, sent
    sender.close()
    assert recorder.errors == [("gone", "gone is gone")]
    assert recorder.sent == [("ok", [5], True), ("gone", [7], True)]


def test_close_sends_what_is_queued():
    recorder = Recorder()
    sender = make_sender(recorder)
    recorder.hold.clear()
    sender.push("a", [0])
    assert recorder.entered.wait(TIMEOUT_S)
    sender.push("b", [1], is_final=True)
    threading.Timer(0.05, recorder.hold.set).start()
    sender.close()
    assert [key for key, _, _ in recorder.sent] == ["a", "b"]
