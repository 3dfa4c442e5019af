"""The work queue's contract: one reconcile of a key at a time, adds coalesce, an add during processing is
not lost, delayed adds come due and merge; the Event poster's per-DPOJob budget."""

from __future__ import annotations

import threading
import time

from dpo_operator.health import Health
from dpo_operator.workqueue import EventPoster, Workers, WorkQueue

A, B = ("ns", "a"), ("ns", "b")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_adds_coalesce_and_an_add_while_processing_comes_back_once() -> None:
    queue = WorkQueue()
    for key in (A, B, A, A):
        queue.add(key)
    assert queue.depth() == 2
    first = queue.get(timeout=1)
    assert first == A
    queue.add(A)
    queue.add(A)
    assert queue.get(timeout=1) == B, "A is being processed: not handed out twice"
    assert queue.get(timeout=0.05) is None
    queue.done(A)
    assert queue.get(timeout=1) == A, "added during processing: reconciled once more"
    queue.done(A)
    queue.done(B)
    assert queue.get(timeout=0.05) is None


def test_delayed_adds_come_due() -> None:
    queue = WorkQueue()
    queue.add_after(A, 0.2)
    queue.add_after(A, 5.0)
    started = time.monotonic()
    assert queue.get(timeout=2) == A
    assert 0.15 <= time.monotonic() - started < 1.0
    queue.done(A)
    queue.shut_down()
    assert queue.get(timeout=1) is None


def test_workers_never_reconcile_one_key_concurrently() -> None:
    queue, health = WorkQueue(), Health()
    running: set = set()
    overlaps, calls = [], []
    lock = threading.Lock()

    def reconcile(key: tuple[str, str]) -> None:
        with lock:
            overlaps.append(key in running)
            running.add(key)
        time.sleep(0.01)
        with lock:
            running.discard(key)
            calls.append(key)

    workers = Workers(queue, reconcile, 4, health)
    workers.start()
    try:
        for _ in range(50):
            for key in (A, B):
                queue.add(key)
            time.sleep(0.002)
        deadline = time.monotonic() + 5
        while queue.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        workers.stop()
    assert calls and not any(overlaps)
    assert len(calls) < 100, "adds coalesced"
    assert health.problems() == []


def test_urgent_keys_go_first_and_a_waiting_key_can_become_urgent() -> None:
    C = ("ns", "c")
    queue = WorkQueue()
    queue.add(A)
    queue.add(B)
    queue.add(C, urgent=True)
    queue.add(B, urgent=True)
    assert queue.urgent_waiting()
    assert [queue.get(timeout=1) for _ in range(2)] == [C, B], "urgent lane first, B moved there"
    assert not queue.urgent_waiting()
    assert queue.get(timeout=1) == A
    assert queue.get(timeout=0.05) is None, "B was handed out once, not again from the other lane"
    assert queue.depth() == 0
    queue.add(A, urgent=True)
    queue.done(A)
    assert queue.urgent_waiting(), "urgency of an add during processing is kept"
    assert queue.get(timeout=1) == A


def test_the_other_lane_takes_turns_once_its_oldest_key_has_waited_too_long() -> None:
    clock = FakeClock()
    queue = WorkQueue(clock)
    urgent = [("ns", f"new-{i}") for i in range(4)]
    queue.add(A)
    queue.add(B)
    for key in urgent:
        queue.add(key, urgent=True)
    assert queue.get(timeout=0) == urgent[0], "the urgent lane first while the others have not waited long"
    clock.now = WorkQueue.READY_MAX_WAIT_S
    assert [queue.get(timeout=0) for _ in range(5)] == [A, urgent[1], B, urgent[2], urgent[3]], "turns"


def test_a_key_moved_to_the_urgent_lane_is_not_taken_from_the_other_one() -> None:
    clock = FakeClock()
    queue = WorkQueue(clock)
    queue.add(A)
    queue.add(A, urgent=True)
    queue.add(B, urgent=True)
    clock.now = WorkQueue.READY_MAX_WAIT_S
    assert [queue.get(timeout=0) for _ in range(2)] == [A, B]
    assert not queue.urgent_waiting() and queue.get(timeout=0) is None


def test_events_wait_for_urgent_work_at_most_max_defer() -> None:
    posted: list[tuple[str, float]] = []
    busy = threading.Event()
    busy.set()
    poster = EventPoster(lambda _d, _t, reason, _m: posted.append((reason, time.monotonic())), Health(), busy.is_set)
    poster.MAX_DEFER_S = 0.6
    poster.start()
    try:
        dpojob = {"metadata": {"name": "a", "namespace": "ns"}}
        started = time.monotonic()
        poster.post(dpojob, "Normal", "Deferred", "m")
        time.sleep(0.3)
        assert posted == [], "urgent work waits: the Event waits too"
        poster.join()
        assert posted[0][0] == "Deferred" and posted[0][1] - started >= 0.55, "posted once MAX_DEFER_S passed"
        busy.clear()
        poster.post(dpojob, "Normal", "Prompt", "m")
        poster.join()
        assert posted[1][0] == "Prompt" and posted[1][1] - posted[0][1] < 0.5
    finally:
        poster.stop()


def test_delayed_adds_of_one_key_merge_keeping_the_earliest_deadline() -> None:
    clock = FakeClock()
    queue = WorkQueue(clock)
    queue.add_after(A, 1.0)
    clock.now = 0.5
    queue.add_after(A, 1.0)
    queue.add_after(A, 0.3)
    clock.now = 0.79
    assert queue.get(timeout=0) is None
    clock.now = 0.8
    assert queue.get(timeout=0) == A, "due at the earliest deadline asked for"
    queue.done(A)
    clock.now = 5.0
    assert queue.get(timeout=0) is None, "the later deadlines were merged into it, not kept"


def test_a_key_added_after_a_delay_100_times_a_second_is_reconciled_once_a_second() -> None:
    """The log-storm of issue 15: 100 log chunks a second, each asking for a reconcile a second later."""
    clock = FakeClock()
    queue = WorkQueue(clock)
    reconciles = 0
    for tick in range(500):  # 5 s in 10 ms steps
        clock.now = tick / 100
        queue.add_after(A, 1.0)
        if (key := queue.get(timeout=0)) is not None:
            reconciles += 1
            queue.done(key)
    assert 4 <= reconciles <= 5


def blocking_poster(clock: FakeClock) -> tuple[EventPoster, threading.Event, list[tuple[str, str, str]]]:
    """An EventPoster whose API server answers only once `release` is set."""
    release, posted = threading.Event(), []

    def post(dpojob: dict, _type: str, reason: str, message: str) -> None:
        release.wait(10)
        posted.append((dpojob["metadata"]["name"], reason, message))

    return EventPoster(post, Health(), clock=clock), release, posted


def test_one_dpojobs_event_flood_does_not_crowd_out_another_dpojobs_events() -> None:
    clock = FakeClock()
    poster, release, posted = blocking_poster(clock)
    poster.start()
    try:
        flapping, quiet = {"metadata": {"name": "a", "namespace": "ns"}}, {"metadata": {"name": "b", "namespace": "ns"}}
        for index in range(2 * EventPoster.capacity):  # more than the queue holds, while the API server is slow
            poster.post(flapping, "Normal", "StageStarted", f"stage {('sft', 'dpo')[index % 2]} started")
        poster.post(quiet, "Normal", "Succeeded", "training finished")
        release.set()
        poster.join()
    finally:
        poster.stop()
    assert ("b", "Succeeded", "training finished") in posted
    assert sum(name == "a" for name, _, _ in posted) == EventPoster.BURST


def test_events_over_budget_are_counted_and_the_next_one_says_how_many() -> None:
    clock = FakeClock()
    poster, release, posted = blocking_poster(clock)
    release.set()
    poster.start()
    try:
        dpojob = {"metadata": {"name": "a", "namespace": "ns"}}
        for _ in range(EventPoster.BURST + 3):
            poster.post(dpojob, "Normal", "StageStarted", "stage dpo started")
        clock.now = EventPoster.REFILL_S - 0.01
        poster.post(dpojob, "Normal", "StageStarted", "stage dpo started")
        clock.now = EventPoster.REFILL_S
        poster.post(dpojob, "Normal", "Succeeded", "training finished")
        poster.join()
    finally:
        poster.stop()
    assert len(posted) == EventPoster.BURST + 1, "one more Event per REFILL_S once the burst is spent"
    assert posted[-1][1:] == (
        "Succeeded",
        "training finished (and 4 earlier Event(s) of this DPOJob not posted: over its rate limit)",
    )


def test_events_of_different_dpojobs_are_posted_side_by_side_and_each_dpojobs_in_order() -> None:
    """One POST at a time fell behind 10,000 DPOJobs' Events: POSTERS threads post at once, while the Events of
    one DPOJob keep their order (the same thread posts them all)."""
    in_flight, most, posted = 0, 0, []
    lock = threading.Lock()

    def post(dpojob: dict, _type: str, reason: str, _message: str) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.05)  # a slow API server
        with lock:
            in_flight -= 1
            posted.append((dpojob["metadata"]["name"], reason))

    poster = EventPoster(post, Health())
    poster.start()
    try:
        for name in range(40):
            for reason in ("JobCreated", "Unschedulable"):
                poster.post({"metadata": {"name": f"d{name}", "namespace": "ns"}}, "Normal", reason, "m")
        poster.join()
    finally:
        poster.stop()
    assert len(posted) == 80 and most > 1, f"{most} at once"
    for name in range(40):
        assert [r for n, r in posted if n == f"d{name}"] == ["JobCreated", "Unschedulable"]
