"""The operator's concurrency model, in one place: one asyncio event loop, and threads for blocking work.

What runs where:

- The event loop (the main thread; main.run starts it, Kopf runs on it) serves /healthz, /readyz and /metrics
  (health.py) from the start, also while a standby waits for the Lease; runs the watches of DPOJobs, trainer
  Jobs and trainer pods, whose index functions fill the ObjectCache (cache.py) and whose event handlers only
  enqueue the DPOJob concerned (main.py); and streams the running trainer pods' logs (followers.py: one task
  per pod, at most 1,000 streams), publishing each pod's progress at most once a second and enqueueing the
  DPOJob with a one-second delay (`add_after`: a key has at most one delayed add pending, later ones merge into
  it), so however fast a pod prints, its DPOJob gets at most one log-driven reconcile and one progress status
  write a second. Nothing on the loop blocks on the API server: every request that waits for an answer is
  made from a thread below.
- `Workers` (settings.workers threads) take DPOJob keys from the WorkQueue and reconcile them. The queue hands
  a key to one worker at a time, so two reconciles of the same DPOJob never overlap (no per-DPOJob locks);
  a key added while it is being reconciled is reconciled once more afterwards; many adds before a worker
  gets to it coalesce into one reconcile. Keys of DPOJobs whose spec was not acted on yet go to an urgent lane
  that workers drain first (main.dpojob_event decides; the reconciler defers a status write behind it), until
  a key of the other lane has waited WorkQueue.READY_MAX_WAIT_S: then the lanes take turns.
- `Resync` (one thread) enqueues every cached DPOJob each settings.resync_seconds (TTL clean-up, retries
  after a refused child, progress of a quiet pod), and every RELIST_EVERY passes replaces the cache with a
  fresh LIST (one request per kind, not per DPOJob) so that a missed DELETED event leaves no ghost.
- `EventPoster` (EventPoster.POSTERS threads, each DPOJob's Events through the same one) posts the Events
  reconciles ask for, off the reconcile's critical path, and after the urgent work (WorkQueue's urgent lane:
  DPOJobs whose spec was not acted on yet); each DPOJob has an Event budget, so one DPOJob's flood cannot fill
  the queue the others' Events wait in.
- The Lease (leader.py): acquired from a thread while the loop answers probes, then renewed by one thread.

The loop and every thread are registered with the Health registry and beat while idle: one that dies or hangs
turns /healthz red (a stalled loop cannot answer at all) and the kubelet restarts the pod.
"""

from __future__ import annotations

import heapq
import logging
import math
import queue as stdlib_queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import metrics
from .cache import Key, ObjectCache
from .health import Health
from .logs import about

log = logging.getLogger(__name__)
_IDLE_WAKE_S = 5.0
URGENT, READY = "urgent", "ready"
"""The work queue's lanes, as the queue metrics name them."""


class WorkQueue:
    """Keys to reconcile: deduplicated while waiting, exclusive while processed, optionally delayed, in two
    lanes.

    The same contract as client-go's workqueue: get() marks a key processing until done(key); an add during
    processing is remembered and re-queued by done(). Keys added `urgent` (a DPOJob whose spec the operator has
    not acted on yet: a new one, a changed one) are handed out before the others (status refreshes from Job
    and pod events, progress lines, resync), so a burst of status work never delays the start of a training
    run, and Events wait for them too (EventPoster). Not for ever: once the oldest key of the other lane has
    waited READY_MAX_WAIT_S, the lanes take turns, so a long stream of new DPOJobs (thousands submitted over
    minutes) still gets the statuses of the first ones written while it goes on, at half the workers' pace at
    worst for each lane."""

    READY_MAX_WAIT_S = 15.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._urgent: deque[tuple[float, Key]] = deque()
        self._ready: deque[tuple[float, Key]] = deque()
        """(when added, key) in order. A key moved to the urgent lane stays in the other deque too; get() skips
        what is no longer waiting."""
        self._waiting: dict[Key, bool] = {}
        """Waiting keys → urgent."""
        self._since: dict[Key, float] = {}
        """Waiting keys → when they started waiting (metrics.QUEUE_LATENCY; a move to the urgent lane keeps it)."""
        self._ready_turn = False
        """While the other lane is overdue (READY_MAX_WAIT_S): whether it has the next turn."""
        self._processing: set[Key] = set()
        self._again: dict[Key, bool] = {}
        self._delayed: list[tuple[float, Key]] = []
        """A heap of (due, key); an entry whose due is no longer the key's in `_due` was merged away."""
        self._due: dict[Key, float] = {}
        """Delayed keys → when they come due: at most one pending delayed add per key."""
        self._shut_down = False

    def add(self, key: Key, urgent: bool = False) -> None:
        with self._cond:
            self._add_locked(key, urgent)

    def add_after(self, key: Key, delay: float) -> None:
        """Add the key `delay` seconds from now. A key already waiting is not delayed further, and one already
        delayed keeps the earlier of its two deadlines: a burst of delayed adds is one reconcile, not one each."""
        with self._cond:
            due = self._clock() + delay
            if key in self._waiting or self._due.get(key, math.inf) <= due:
                return
            self._due[key] = due
            heapq.heappush(self._delayed, (due, key))
            self._cond.notify()

    def get(self, timeout: float) -> Key | None:
        """The next key to reconcile (now marked processing), or None after `timeout` or on shut-down."""
        deadline = self._clock() + timeout
        with self._cond:
            while not self._shut_down:
                now = self._clock()
                while self._delayed and self._delayed[0][0] <= now:
                    due, key = heapq.heappop(self._delayed)
                    if self._due.get(key) == due:
                        del self._due[key]
                        self._add_locked(key, False)
                lanes = (self._urgent, self._ready)
                if self._ready_overdue(now):
                    self._ready_turn = not self._ready_turn
                    if self._ready_turn:
                        lanes = (self._ready, self._urgent)
                for lane in lanes:
                    while lane:
                        _, key = lane.popleft()
                        if self._waiting.get(key) is (lane is self._urgent):  # else a stale entry: skip it
                            del self._waiting[key]
                            self._processing.add(key)
                            waited = now - self._since.pop(key, now)
                            metrics.QUEUE_LATENCY.labels(URGENT if lane is self._urgent else READY).observe(waited)
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

    def depths(self) -> dict[str, int]:
        """Keys waiting in each lane (the dpo_operator_workqueue_depth gauge)."""
        with self._cond:
            urgent = sum(self._waiting.values())
            return {URGENT: urgent, READY: len(self._waiting) - urgent}

    def urgent_waiting(self) -> bool:
        """Whether a DPOJob waits for its spec to be acted on (a key leaves the urgent lane when it is taken)."""
        with self._cond:
            return bool(self._urgent)

    def shut_down(self) -> None:
        with self._cond:
            self._shut_down = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no key is processed (after shut_down: the reconciles in flight have ended); False when
        some still is after `timeout` seconds. The leader releases its Lease only then (leader.py)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._processing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))  # done() does not notify: poll
            return True

    def _ready_overdue(self, now: float) -> bool:
        """Whether the oldest key waiting in the other lane has waited READY_MAX_WAIT_S (lock held)."""
        while self._ready and self._waiting.get(self._ready[0][1]) is not False:
            self._ready.popleft()  # handed out, or moved to the urgent lane
        return bool(self._ready) and now - self._ready[0][0] >= self.READY_MAX_WAIT_S

    def _add_locked(self, key: Key, urgent: bool) -> None:
        if self._shut_down:
            return
        if key in self._processing:
            self._again[key] = self._again.get(key, False) or urgent
        elif key not in self._waiting or (urgent and not self._waiting[key]):
            self._since.setdefault(key, self._clock())
            self._waiting[key] = urgent
            (self._urgent if urgent else self._ready).append((self._clock(), key))
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


@dataclass
class _Budget:
    """One DPOJob's Event token bucket."""

    tokens: float
    at: float
    """When `tokens` was last brought up to date."""
    omitted: int = 0
    """Events refused since the last one posted."""


_Queued = tuple[float, tuple[dict[str, Any], str, str, str]] | None
"""An Event waiting to be posted (when it was enqueued; post_event's arguments), or None: stop."""


class EventPoster:
    """Posts Kubernetes Events from POSTERS threads, each DPOJob's in order (a DPOJob's Events always go through
    the same thread): a reconcile only enqueues them. Events are for people: they wait while DPOJobs wait for
    their spec to be acted on (`busy`, at most MAX_DEFER_S), and a full queue (the API server refusing them for
    long) drops the newest with a log line rather than slowing reconciles down. One thread, one POST at a time,
    fell behind 10,000 DPOJobs' two Events each and its queue overflowed.

    Each DPOJob has an Event budget, a token bucket per involved object as client-go's Event spam filter keeps:
    BURST Events at once, then one per REFILL_S. Events over it are not queued, only counted, and the DPOJob's
    next Event within budget says how many were left out (aggregated, as Kubernetes combines similar Events). A
    run's whole lifecycle posts far fewer than BURST, while a DPOJob whose status flaps (a trainer printing
    alternating stages) can no longer fill the queue that every other DPOJob's Events wait in."""

    name = "events"
    capacity = 20_000
    """Events queued at most, over all threads (two for each of 10,000 DPOJobs submitted at once; each entry
    holds the DPOJob's identity and the message: a few MiB when full)."""
    POSTERS = 4
    MAX_DEFER_S = 30.0
    BURST = 25
    REFILL_S = 10.0

    def __init__(
        self,
        post: Callable[[dict[str, Any], str, str, str], None],
        health: Health,
        busy: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._post, self.health, self._busy, self._clock = post, health, busy, clock
        self._queues: list[stdlib_queue.Queue[_Queued]] = [
            stdlib_queue.Queue(self.capacity // self.POSTERS) for _ in range(self.POSTERS)
        ]
        self._names = [f"{self.name}-{index}" for index in range(self.POSTERS)]
        """Each thread's name, as Health knows it."""
        self._budgets: dict[Key, _Budget] = {}
        self._prune_at = 1024
        self._lock = threading.Lock()
        """Guards the budgets: reconciles post from every worker thread."""
        self._stopped = threading.Event()

    def post(self, dpojob: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = dpojob["metadata"]
        with self._lock:
            omitted = self._spend((meta["namespace"], meta["name"]))
        if omitted is None:
            return
        if omitted:
            message = f"{message} (and {omitted} earlier Event(s) of this DPOJob not posted: over its rate limit)"
        # Only what post_event reads: the DPOJob passed may be a whole status patch answer (managed fields and
        # all), which a queued Event would otherwise keep alive until it is posted.
        try:
            involved = {"metadata": {field: meta[field] for field in ("namespace", "name", "uid") if field in meta}}
            shard = self._queues[hash((meta["namespace"], meta["name"])) % self.POSTERS]
            shard.put_nowait((self._clock(), (involved, event_type, reason, message)))
        except stdlib_queue.Full:
            log.warning("event queue full; dropped %s %s on %s", event_type, reason, meta["name"])

    def join(self) -> None:
        """Wait until every Event enqueued so far was posted (tests)."""
        for shard in self._queues:
            shard.join()

    def start(self) -> None:
        for name, shard in zip(self._names, self._queues, strict=True):
            thread = threading.Thread(target=self._run, args=(name, shard), name=name, daemon=True)
            self.health.register(name, 120.0, thread)
            thread.start()

    def stop(self) -> None:
        self._stopped.set()
        for name, shard in zip(self._names, self._queues, strict=True):
            shard.put(None)
            self.health.unregister(name)

    def _spend(self, key: Key) -> int | None:
        """Take one Event from the DPOJob's budget: None when it is spent (the Event is counted as omitted),
        else how many were omitted before this one."""
        now = self._clock()
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= self._prune_at:
                self._prune(now)
            budget = self._budgets[key] = _Budget(self.BURST, now)
        budget.tokens, budget.at = min(self.BURST, budget.tokens + (now - budget.at) / self.REFILL_S), now
        if budget.tokens < 1:
            if not budget.omitted:
                log.warning("%s/%s posts Events faster than its budget; omitting them for now", *key, extra=about(*key))
            budget.omitted += 1
            return None
        budget.tokens -= 1
        omitted, budget.omitted = budget.omitted, 0
        return omitted

    def _prune(self, now: float) -> None:
        """Forget full budgets that omitted nothing: the same as none (bounds memory by the DPOJobs seen lately)."""
        self._budgets = {
            key: b
            for key, b in self._budgets.items()
            if b.omitted or b.tokens + (now - b.at) / self.REFILL_S < self.BURST
        }
        self._prune_at = 2 * len(self._budgets) + 1024

    def _run(self, name: str, shard: stdlib_queue.Queue[_Queued]) -> None:
        while True:
            self.health.beat(name)
            try:
                entry = shard.get(timeout=_IDLE_WAKE_S)
            except stdlib_queue.Empty:
                continue
            try:
                if entry is None:
                    return
                enqueued, item = entry
                while self._busy() and self._clock() - enqueued < self.MAX_DEFER_S:
                    if self._stopped.wait(0.2):
                        return
                    self.health.beat(name)
                self._post(*item)
            except Exception as exc:  # no connection at all (urllib3 MaxRetryError): this Event is lost
                log.warning("could not post event %s: %s", entry[1][2] if entry else None, exc)
            finally:
                shard.task_done()
