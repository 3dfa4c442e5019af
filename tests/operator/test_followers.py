"""Log followers under faults a real API server will not produce on demand (a stand-in CoreV1Api):
streams that die after delivering data, followers that give up, endless lines without a newline."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

from urllib3.exceptions import ProtocolError

from dpo_operator.followers import MAX_LINE_BYTES, LineSplitter, LogFollowers, _Follower


def progress_line(step: int) -> bytes:
    event = {"kind": "dpo-trainer/progress", "event": "log", "stage": "dpo", "step": step, "totalSteps": 100}
    return json.dumps({**event, "time": 1000.0 + step}).encode() + b"\n"


class Stream:
    """A pod-log response: the chunks, then the end of the stream or an error."""

    def __init__(self, chunks: list[bytes], error: Exception | None) -> None:
        self.chunks, self.error = list(chunks), error

    def read1(self, _: int) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.error is not None:
            raise self.error
        return b""

    def release_conn(self) -> None:
        pass


class FlakyCore:
    """read_namespaced_pod_log answers with whatever `attempt(n)` returns (a Stream) or raises."""

    def __init__(self, attempt: Callable[[int], Stream]) -> None:
        self.attempt, self.attempts = attempt, 0

    def read_namespaced_pod_log(self, *_: object, **__: object) -> Stream:
        self.attempts += 1
        return self.attempt(self.attempts)

    def read_namespaced_pod(self, *_: object) -> SimpleNamespace:
        return SimpleNamespace(status=SimpleNamespace(phase="Running"))


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def follower(core: FlakyCore) -> _Follower:
    follower = _Follower(core, "ns", "pod", lambda: None)
    follower.give_up_after, follower.retry_seconds = 3, 0.001
    return follower


def test_failures_are_counted_in_a_row_not_in_total() -> None:
    """Each stream delivers a line, then the connection drops (an API server restart): never give up."""
    core = FlakyCore(lambda n: Stream([progress_line(n)], ProtocolError("connection reset")))
    follower_ = follower(core)
    follower_.start()
    wait_until(lambda: core.attempts >= 20)
    assert follower_.is_alive(), "20 outages, each after data arrived, are not 3 failures in a row"
    wait_until(lambda: follower_.progress.step >= 20)
    follower_.stopping.set()


def test_a_follower_that_gave_up_is_replaced_keeping_its_progress() -> None:
    healthy = threading.Event()

    def attempt(n: int) -> Stream:
        if n == 1:
            return Stream([progress_line(5)], OSError("refused"))
        if not healthy.is_set():
            raise OSError("connection refused")
        return Stream([progress_line(6)], None)

    core = FlakyCore(attempt)
    followers = LogFollowers(core, lambda namespace, name: None)
    pod = {"metadata": {"name": "pod", "creationTimestamp": "x"}, "status": {"phase": "Running"}}
    pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"running": {"startedAt": "t0"}}}]
    original = _Follower.give_up_after, _Follower.retry_seconds
    _Follower.give_up_after, _Follower.retry_seconds = 3, 0.001
    try:
        followers.ensure("ns", "job", [pod])
        first = followers._followers["ns", "pod"]
        wait_until(lambda: not first.is_alive())
        assert followers.active() == 0 and not first.finished
        healthy.set()
        followers.ensure("ns", "job", [pod])  # the next reconcile
        second = followers._followers["ns", "pod"]
        assert second is not first and second.progress is first.progress
        wait_until(lambda: second.progress.step == 6)
        assert followers.latest_progress("ns", [pod])["progress"]["step"] == 6
    finally:
        _Follower.give_up_after, _Follower.retry_seconds = original
        followers.stop_all()


def test_an_endless_line_is_dropped_in_bounded_memory() -> None:
    splitter = LineSplitter()
    chunk = b"x" * 65536
    started = time.monotonic()
    for _ in range(160):  # 10 MiB without a newline
        assert splitter.feed(chunk) == []
        assert len(splitter._partial) <= MAX_LINE_BYTES
    assert time.monotonic() - started < 2.0, "linear, not quadratic, in the line's length"
    assert splitter.feed(b"tail of the long line\n" + progress_line(7)) == [progress_line(7)[:-1]]
    assert splitter.feed(b"short ") == [] and splitter.feed(b"line\n") == [b"short line"]


def test_follower_reads_progress_after_an_endless_line() -> None:
    chunks = [b"y" * 65536] * 40 + [b"\n", progress_line(9)]

    def attempt(n: int) -> Stream:
        if n > 1:
            raise OSError("gone")  # then give up, so that run() returns
        return Stream(chunks, None)

    follower_ = follower(FlakyCore(attempt))
    follower_.run()
    assert follower_.progress.step == 9


def test_ended_containers_are_not_followed() -> None:
    """After an operator restart, retained finished pods must not each get a thread re-reading their log."""
    core = FlakyCore(lambda n: Stream([progress_line(1)], None))
    followers = LogFollowers(core, lambda namespace, name: None)
    ended = {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"exitCode": 0}}}]}
    followers.ensure("ns", "job", [{"metadata": {"name": f"done-{i}"}, "status": ended} for i in range(50)])
    assert followers.active() == 0 and core.attempts == 0
