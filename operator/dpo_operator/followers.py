"""Follow trainer pod logs and fold their progress events, so metrics reach status within seconds.

Why the pod log: trainer pods then need no Kubernetes API rights at all (their token is not even mounted),
the channel works on every cluster version, and `kubectl logs` shows users the same lines. One thread per
running trainer pod streams its log (the API server proxies it from the kubelet).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from .manifests import CONTAINER
from .progress import TrainerProgress, parse_line
from .status import container_state

log = logging.getLogger(__name__)
_READ_TIMEOUT = 120.0
_REPLAY_MARGIN = 60  # seconds of log re-read on reconnect, against clock skew between node and operator
MAX_LINE_BYTES = 64 * 1024
"""Longer lines are dropped unread: a progress event is < 4 KiB, and an endless line must not grow memory."""


class LineSplitter:
    """Complete log lines out of arbitrary chunks, holding at most MAX_LINE_BYTES of an unfinished line."""

    def __init__(self) -> None:
        self._partial = b""
        self._discarding = False  # inside an over-long line: drop everything up to its newline

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, rest = chunk.split(b"\n")
        if lines:
            lines[0] = self._partial + lines[0]
            if self._discarding:
                lines.pop(0)
            self._partial, self._discarding = b"", False
        if not self._discarding:
            self._partial += rest
            if len(self._partial) > MAX_LINE_BYTES:
                self._partial, self._discarding = b"", True
        return [line for line in lines if len(line) <= MAX_LINE_BYTES]


class _Follower(threading.Thread):
    """Streams one pod's log into a TrainerProgress until the container ends or the pod goes away.

    Failures are counted in a row (any attempt that received data resets the count); after `give_up_after`
    the thread ends without `finished`, and LogFollowers.ensure starts a new one with the same progress.
    """

    give_up_after = 30  # consecutive failed attempts, `retry_seconds` apart (~1 min)
    retry_seconds = 2.0

    def __init__(
        self,
        core: client.CoreV1Api,
        namespace: str,
        pod: str,
        notify: Callable[[], None],
        progress: TrainerProgress | None = None,
    ) -> None:
        super().__init__(name=f"logs-{namespace}/{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.notify = core, namespace, pod, notify
        self.progress = progress or TrainerProgress()
        self.progress_lock = threading.Lock()
        self.stopping = threading.Event()
        self.finished = False
        """The container ended or the pod is gone: nothing more will come."""
        self._received = False

    def run(self) -> None:
        failures = 0
        while not self.stopping.is_set() and failures < self.give_up_after:
            self._received = False
            try:
                if self._stream_once():
                    self.finished = True
                    return
                failures = 0
            except ApiException as exc:
                if exc.status == 404:
                    self.finished = True
                    return
                failures = 0 if self._received else failures + 1
                log.debug("log stream of %s/%s: %s", self.namespace, self.pod, exc.reason)
            except (HTTPError, OSError):
                failures = 0 if self._received else failures + 1
            self.stopping.wait(self.retry_seconds)
        if not self.stopping.is_set():
            log.warning(
                "log stream of %s/%s failed %d times in a row; retried later", self.namespace, self.pod, failures
            )

    def _stream_once(self) -> bool:
        """Fold the log's new progress events. True when the container has ended (nothing more will come)."""
        since = None
        if self.progress.updated is not None:
            since = max(1, int(time.time() - self.progress.updated) + _REPLAY_MARGIN)
        response = self.core.read_namespaced_pod_log(
            self.pod,
            self.namespace,
            container=CONTAINER,
            follow=True,
            since_seconds=since,
            _preload_content=False,
            _request_timeout=(10, _READ_TIMEOUT),
        )
        splitter = LineSplitter()
        try:
            # read1 returns whatever arrived; stream(n) would wait for n bytes and delay progress by minutes.
            while chunk := response.read1(65536):
                if self.stopping.is_set():
                    return True
                self._received = True
                for raw in splitter.feed(chunk):
                    event = parse_line(raw.decode("utf-8", "replace"))
                    if event is None or self._already_folded(event):
                        continue
                    with self.progress_lock:
                        self.progress.apply(event)
                    self.notify()
        finally:
            response.release_conn()
        pod = self.core.read_namespaced_pod(self.pod, self.namespace)
        return pod.status.phase in ("Succeeded", "Failed")

    def _already_folded(self, event: dict[str, Any]) -> bool:
        """Events of one container come in time order, so a re-read skips everything up to the last one folded."""
        last, when = self.progress.updated, event.get("time")
        return last is not None and isinstance(when, int | float) and when <= last


class LogFollowers:
    """The followers of one operator process, keyed by pod; their progress outlives the thread."""

    def __init__(self, core: client.CoreV1Api, mark_dirty: Callable[[str, str], None]) -> None:
        self.core = core
        self.mark_dirty = mark_dirty
        self._followers: dict[tuple[str, str], _Follower] = {}
        self._owner: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def ensure(self, namespace: str, dpojob: str, pods: list[dict[str, Any]]) -> None:
        """Follow every running pod of the run not followed yet; forget pods that are gone.

        A container that has already ended is not followed: its outcome and final metrics are in its
        termination message, and re-reading the whole log of every retained pod after an operator restart
        would cost a thread and a full log transfer each."""
        names = {p["metadata"]["name"] for p in pods}
        with self._lock:
            for key in [k for k, owner in self._owner.items() if owner == dpojob and k[0] == namespace]:
                if key[1] not in names:
                    self._followers.pop(key).stopping.set()
                    del self._owner[key]
            for pod in pods:
                key = (namespace, pod["metadata"]["name"])
                state = container_state(pod)
                previous = self._followers.get(key)
                if previous is not None and (previous.is_alive() or previous.finished):
                    continue
                if not state.get("running"):
                    continue
                # A follower that gave up is replaced, keeping what it folded (its replay guard included).
                follower = _Follower(
                    self.core,
                    namespace,
                    key[1],
                    lambda: self.mark_dirty(namespace, dpojob),
                    previous.progress if previous is not None else None,
                )
                self._followers[key], self._owner[key] = follower, dpojob
                follower.start()

    def latest_progress(self, namespace: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Status fields from the newest pod that reported anything."""
        newest_first = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
        with self._lock:
            for pod in newest_first:
                follower = self._followers.get((namespace, pod["metadata"]["name"]))
                if follower is not None and follower.progress.events_seen:
                    with follower.progress_lock:
                        return follower.progress.status_fields()
        return None

    def active(self) -> int:
        """Followers whose stream is still open (the dpo_operator_log_followers gauge)."""
        with self._lock:
            return sum(f.is_alive() for f in self._followers.values())

    def forget(self, namespace: str, dpojob: str) -> None:
        """Stop following a deleted DPOJob's pods."""
        self.ensure(namespace, dpojob, [])

    def stop_all(self) -> None:
        with self._lock:
            for follower in self._followers.values():
                follower.stopping.set()
