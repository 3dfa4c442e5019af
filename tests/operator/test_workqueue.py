"""The work queue's contract: one reconcile of a key at a time, adds coalesce, an add during processing is
not lost, delayed adds come due."""

from __future__ import annotations

import threading
import time

from dpo_operator.health import Health
from dpo_operator.workqueue import EventPoster, Workers, WorkQueue

A, B = ("ns", "a"), ("ns", "b")


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
