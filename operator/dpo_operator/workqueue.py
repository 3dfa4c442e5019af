"""The operator's concurrency model, in one place.

What runs where:

- Kopf's event loop (the main thread) runs the watches of DPOJobs, trainer Jobs and trainer pods. Its index
  functions fill the ObjectCache (cache.py); its event handlers only enqueue the DPOJob concerned
  (handlers.py). Nothing there blocks on the API server.
- `Workers` (settings.workers threads) take DPOJob keys from the WorkQueue and reconcile them. The queue hands
  a key to one worker at a time, so two reconciles of the same DPOJob never overlap (no per-DPOJob locks);
  a key added while it is being reconciled is reconciled once more afterwards; many adds before a worker
  gets to it coalesce into one reconcile. Keys of DPOJobs whose spec was not acted on yet go to an urgent lane
  that workers drain first (handlers.on_dpojob decides; the reconciler defers a status write behind it).
- `Resync` (one thread) enqueues every cached DPOJob each settings.resync_seconds (TTL clean-up, retries
  after a refused child, progress of a quiet pod), and every RELIST_EVERY passes replaces the cache with a
  fresh LIST (one request per kind, not per DPOJob) so that a missed DELETED event leaves no ghost.
- `EventPoster` (one thread) posts the Events reconciles ask for, off the reconcile's critical path, and
  after the urgent work (WorkQueue's urgent lane: DPOJobs whose spec was not acted on yet).
- Log followers (followers.py, their own event-loop thread) stream trainer pod logs and enqueue the DPOJob
  with a delay (`add_after`), so a burst of progress lines costs at most one reconcile per second.

Every thread is registered with the Health registry and beats while idle: one that dies or hangs turns
/healthz red and the kubelet restarts the pod.
"""

from __future__ import annotations

import heapq
import logging
import queue as stdlib_queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from . import metrics
from .cache import Key, ObjectCache
from .health import Health

log = logging.getLogger(__name__)
_IDLE_WAKE_S = 5.0


class WorkQueue:
    """Keys to reconcile: deduplicated while waiting, exclusive while processed, optionally delayed, in two
    lanes.

    The same contract as client-go's workqueue: get() marks a key processing until done(key); an add during
    processing is remembered and re-queued by done(). Keys added `urgent` (a DPOJob whose spec the operator has
    not acted on yet: a new one, a changed one) are handed out before the others (status refreshes from Job
    and pod events, progress lines, resync), so a burst of status work never delays the start of a training
    run, and Events wait for them too (EventPoster)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._urgent: deque[Key] = deque()
        self._ready: deque[Key] = deque()
        self._waiting: dict[Key, bool] = {}
        """Waiting keys → urgent. A key moved to the urgent lane stays in the other deque too; get() skips
        what is no longer waiting."""
        self._processing: set[Key] = set()
        self._again: dict[Key, bool] = {}
        self._delayed: list[tuple[float, Key]] = []
        self._shut_down = False

    def add(self, key: Key, urgent: bool = False) -> None:
        with self._cond:
            self._add_locked(key, urgent)

    def add_after(self, key: Key, delay: float) -> None:
        """Add the key `delay` seconds from now (a key already waiting is not delayed further)."""
        with self._cond:
            if key in self._waiting:
                return
            heapq.heappush(self._delayed, (time.monotonic() + delay, key))
            self._cond.notify()

    def get(self, timeout: float) -> Key | None:
        """The next key to reconcile (now marked processing), or None after `timeout` or on shut-down."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._shut_down:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._add_locked(heapq.heappop(self._delayed)[1], False)
                for lane in (self._urgent, self._ready):
                    while lane:
                        key = lane.popleft()
                        if self._waiting.pop(key, None) is not None:
                            self._processing.add(key)
                            return key
                wake = min([deadline] + [due for due, _ in self._delayed[:1]])
                if now >= deadline:
                    return None
                self._cond.wait(wake - now)
            return None

    def done(self, key: Key) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._again:
                self._add_locked(key, self._again.pop(key))

    @property
    def closed(self) -> bool:
        return self._shut_down

    def depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    def urgent_waiting(self) -> bool:
        """Whether a DPOJob waits for its spec to be acted on (a key leaves the urgent lane when it is taken)."""
        with self._cond:
            return bool(self._urgent)

    def shut_down(self) -> None:
        with self._cond:
            self._shut_down = True
            self._cond.notify_all()

    def _add_locked(self, key: Key, urgent: bool) -> None:
        if self._shut_down:
            return
        if key in self._processing:
            self._again[key] = self._again.get(key, False) or urgent
        elif key not in self._waiting or (urgent and not self._waiting[key]):
            self._waiting[key] = urgent
            (self._urgent if urgent else self._ready).append(key)
            self._cond.notify()


class Workers:
    """settings.workers threads running `reconcile(key)` for keys from the queue."""

    max_silence = 600.0
    """A reconcile is a handful of API calls, each retried for at most a few minutes while the API server is
    unreachable; a worker silent for longer than this is stuck."""

    def __init__(self, queue: WorkQueue, reconcile: Callable[[Key], None], count: int, health: Health) -> None:
        self.queue, self.reconcile, self.count, self.health = queue, reconcile, count, health
        self.names = [f"worker-{index}" for index in range(count)]

    def start(self) -> None:
        for name in self.names:
            thread = threading.Thread(target=self._run, args=(name,), name=name, daemon=True)
            self.health.register(name, self.max_silence, thread)
            thread.start()

    def stop(self) -> None:
        self.queue.shut_down()
        for name in self.names:
            self.health.unregister(name)

    def _run(self, name: str) -> None:
        while True:
            self.health.beat(name)
            key = self.queue.get(timeout=_IDLE_WAKE_S)
            if key is None:
                if self.queue.closed:
                    return
                continue
            try:
                self.reconcile(key)
            finally:
                self.queue.done(key)


class Resync:
    """Every `period` seconds: enqueue every cached DPOJob; every RELIST_EVERY passes, relist first."""

    RELIST_EVERY = 10
    name = "resync"

    def __init__(
        self,
        queue: WorkQueue,
        cache: ObjectCache,
        relist: Callable[[], None],
        period: float,
        health: Health,
    ) -> None:
        self.queue, self.cache, self.relist, self.period, self.health = queue, cache, relist, period, health
        self._stopped = threading.Event()

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        # A relist of every DPOJob, Job and pod may take a while on a big cluster.
        self.health.register(self.name, self.period + 300.0, thread)
        thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self.health.unregister(self.name)

    def _run(self) -> None:
        passes = 0
        while not self._stopped.wait(self.period):
            self.health.beat(self.name)
            passes += 1
            if passes % self.RELIST_EVERY == 0:
                try:
                    self.relist()
                except Exception as exc:  # ApiException, or no connection at all (urllib3 MaxRetryError)
                    metrics.RESYNC_ERRORS.inc()
                    log.warning("relist failed: %s; the watches keep the cache current meanwhile", exc)
            for key in self.cache.dpojob_keys():
                self.queue.add(key)
            self.health.beat(self.name)


class EventPoster:
    """Posts Kubernetes Events from one thread, in order: a reconcile only enqueues them. Events are for
    people: they wait while DPOJobs wait for their spec to be acted on (`busy`, at most MAX_DEFER_S), and a
    full queue (the API server refusing them for long) drops the newest with a log line rather than slowing
    reconciles down."""

    name = "events"
    capacity = 10_000
    MAX_DEFER_S = 30.0

    def __init__(
        self,
        post: Callable[[dict[str, Any], str, str, str], None],
        health: Health,
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        self._post, self.health, self._busy = post, health, busy
        self._queue: stdlib_queue.Queue[tuple[float, tuple[dict[str, Any], str, str, str]] | None] = stdlib_queue.Queue(
            self.capacity
        )
        self._stopped = threading.Event()

    def post(self, dpojob: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        try:
            item = ({"metadata": dict(dpojob["metadata"])}, event_type, reason, message)
            self._queue.put_nowait((time.monotonic(), item))
        except stdlib_queue.Full:
            log.warning("event queue full; dropped %s %s on %s", event_type, reason, dpojob["metadata"]["name"])

    def join(self) -> None:
        """Wait until every Event enqueued so far was posted (tests)."""
        self._queue.join()

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.health.register(self.name, 120.0, thread)
        thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self.health.unregister(self.name)

    def _run(self) -> None:
        while True:
            self.health.beat(self.name)
            try:
                entry = self._queue.get(timeout=_IDLE_WAKE_S)
            except stdlib_queue.Empty:
                continue
            try:
                if entry is None:
                    return
                enqueued, item = entry
                while self._busy() and time.monotonic() - enqueued < self.MAX_DEFER_S:
                    if self._stopped.wait(0.2):
                        return
                    self.health.beat(self.name)
                self._post(*item)
            except Exception as exc:  # no connection at all (urllib3 MaxRetryError): this Event is lost
                log.warning("could not post event %s: %s", entry[1][2] if entry else None, exc)
            finally:
                self._queue.task_done()
