"""Follow trainer pod logs and fold their progress events, so metrics reach status within seconds.

Why the pod log: trainer pods then need no Kubernetes API rights at all (their token is not even mounted),
the channel works on every cluster version, and `kubectl logs` shows users the same lines.

How: every running trainer pod's log is one HTTP stream (`GET .../pods/<pod>/log?follow=true`, proxied by the
API server from the kubelet), read by an asyncio task. All tasks share ONE event loop in ONE thread owned by
LogFollowers (not Kopf's loop: Kopf's watches must not wait behind a thousand log streams, and Kopf's loop is
not ours to block or stop) and one aiohttp session built from the kubernetes client's credentials. So 1,000
running jobs cost 1,000 sockets and 1,000 small tasks, not 1,000 OS threads; a finished pod costs nothing.

Bounded: at most `max_streams` log streams are open at once (DEFAULT_MAX_STREAMS). Further pods wait, in
order, for a slot and are followed once one frees (a pod ends, or an idle stream reconnects and queues up
behind them); a waiting pod's final metrics still arrive in its termination message, and when its turn comes
the log is read from its start, so nothing it printed is lost.

Rate-limited: a pod prints as fast as it likes, but its progress is published (what reconciles read) at most
once per PUBLISH_INTERVAL_S, each publish asking for one reconcile, so its DPOJob's status is written at most
that often for progress, whatever else triggers reconciles meanwhile (the watch event of each status write
does); the newest progress is published when the interval ends, so none is held back longer.

The loop's thread registers with the Health registry as LOOP_NAME and beats every few seconds: if it dies or
stalls, /healthz fails and names it, instead of progress silently stopping for every job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import math
import resource
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes import client

from dpojob_api.vocabulary import FINISHED_POD_PHASES

from .health import Health
from .manifests import CONTAINER
from .progress import TrainerProgress, parse_line
from .status import container_state

log = logging.getLogger(__name__)
_REPLAY_MARGIN = 60  # seconds of log re-read on reconnect, against delivery delays (both ends use our clock)
MAX_LINE_BYTES = 64 * 1024
"""Longer lines are dropped unread: a progress event is < 4 KiB, and an endless line must not grow memory."""
LOOP_NAME = "log-followers"
"""The event loop's name in the Health registry (and its thread's name)."""
DEFAULT_MAX_STREAMS = 1000
"""Log streams open at once. Why 1,000: it follows 1,000 concurrently running jobs (one running pod each), the
scale the operator is sized for, without any waiting, within the chart's memory limit. What one stream costs:
on the API server a long-running request (exempt from --max-requests-inflight and priority-and-fairness seats)
plus a kubelet connection it proxies, a few per node; here one socket (a file descriptor: the soft
RLIMIT_NOFILE is raised to fit), aiohttp and task state, OpenSSL's per-connection state and the read buffer
(see _EventLoop; the measured cost is in docs/benchmarks.md, "Log followers"). Beyond the bound, memory (and the
kubelets' and API server's work) would grow without a limit with the number of running pods; pods beyond it
wait their turn instead."""
PUBLISH_INTERVAL_S = 1.0
"""A pod's progress reaches status at most this often (docs/operator.md promises one write a second)."""
_TLS_READ_BUFFER = 16 * 1024
_FINISHED, _RECONNECT, _FAILED = "finished", "reconnect", "failed"


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


@dataclass
class _PodLog:
    """What has been read of one pod's log; outlives its followers (a replacement carries it on)."""

    progress: TrainerProgress = field(default_factory=TrainerProgress)
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Guards `progress`: the loop thread folds into it while reconcilers read it."""
    read_until: float | None = None
    """Our wall-clock time up to which the log has been delivered (last data, or the end of a stream)."""
    published: dict[str, Any] | None = None
    """`progress`'s status fields as last published: what reconciles read (under `lock`)."""
    published_at: float = -math.inf
    publish_due: float = -math.inf
    """time.monotonic() of the publish scheduled next; past when none is (loop thread only)."""

    def since_seconds(self, now: float) -> int | None:
        """sinceSeconds for the next request: what we may have missed plus a margin; None reads the whole log."""
        anchor = self.read_until if self.read_until is not None else self.progress.updated
        if anchor is None:
            return None
        return max(1, math.ceil(now - anchor) + _REPLAY_MARGIN)


class _Follower:
    """One pod's follower: a task on the loop that streams the log into a TrainerProgress until the container
    ends or the pod goes away.

    Failures are counted in a row (an attempt that received data, or whose stream was merely idle, resets the
    count); after `give_up_after` the task ends without `finished`, and LogFollowers.ensure starts a new one
    with the same progress.
    """

    def __init__(self, namespace: str, pod: str, notify: Callable[[], None], state: _PodLog | None) -> None:
        self.namespace, self.pod, self.notify = namespace, pod, notify
        self.state = state or _PodLog()
        self.finished = False
        """The container ended or the pod is gone: nothing more will come."""
        self.streaming = False
        """Holds a slot: its log stream (or the pod check after it) is open."""
        self.received = False
        self.last_error = ""
        self.future: concurrent.futures.Future[None] | None = None

    @property
    def progress(self) -> TrainerProgress:
        return self.state.progress

    @property
    def progress_lock(self) -> threading.Lock:
        return self.state.lock

    def is_alive(self) -> bool:
        """Its task is running: streaming, waiting for a slot, or between attempts."""
        return self.future is not None and not self.future.done()

    def stop(self) -> None:
        if self.future is not None:
            self.future.cancel()  # cancels the task on the loop (thread-safe)

    def fold(self, chunk: bytes, splitter: LineSplitter) -> bool:
        """Fold the chunk's new progress events; True when any was folded."""
        folded = False
        for raw in splitter.feed(chunk):
            event = parse_line(raw.decode("utf-8", "replace"))
            if event is None:
                continue
            with self.state.lock:
                if self._already_folded(event):
                    continue
                self.progress.apply(event)
            folded = True
        return folded

    def progressed(self, loop: asyncio.AbstractEventLoop) -> None:
        """New progress was folded: publish it now, or when PUBLISH_INTERVAL_S since the last publish ends (a
        publish already scheduled carries it too)."""
        state, now = self.state, time.monotonic()
        if state.publish_due > now:
            return
        state.publish_due = max(now, state.published_at + PUBLISH_INTERVAL_S)
        if state.publish_due == now:
            self._publish(now)
        else:
            loop.call_at(state.publish_due, self._publish, state.publish_due)
            self.notify()  # mark_dirty delays that reconcile past the publish: ≈ 1 s latency, not 2

    def _publish(self, due: float) -> None:
        if due != self.state.publish_due:
            return  # superseded: a fold found this publish overdue and published at once
        with self.state.lock:
            self.state.published = self.progress.status_fields()
            self.state.published_at = time.monotonic()
        self.notify()

    def _already_folded(self, event: dict[str, Any]) -> bool:
        """Events of one container come in time order, so a re-read skips everything up to the last one folded."""
        last, when = self.progress.updated, event.get("time")
        return last is not None and isinstance(when, int | float) and when <= last


class _StatusError(Exception):
    """The API server answered with an error status; the message is its Status message when there is one."""

    def __init__(self, status: int, body: bytes) -> None:
        text = body.decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            text = json.loads(text).get("message") or text
        super().__init__(f"{status}: {' '.join(str(text).split())[:300]}")
        self.status = status


def ssl_context(configuration: client.Configuration) -> ssl.SSLContext | None:
    """TLS as the kubernetes client does it (rest.RESTClientObject): CA file or data, client certificate,
    verify_ssl and assert_hostname. None for a plain-HTTP host."""
    if not configuration.host.startswith("https"):
        return None
    ca_data = getattr(configuration, "ca_cert_data", None)
    if isinstance(ca_data, bytes):
        ca_data = ca_data.decode()
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None, cadata=ca_data or None)
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif getattr(configuration, "assert_hostname", None) is False:
        context.check_hostname = False
    return context


class _Api:
    """The loop's side of the API server: one aiohttp session (created on the loop, used only on it) with the
    kubernetes client's credentials, and the stream slots."""

    def __init__(self, configuration: client.Configuration, max_streams: int, connect: float, read: float) -> None:
        tls = ssl_context(configuration)
        self.configuration = configuration
        self.connect_timeout = connect
        self.slots = asyncio.Semaphore(max_streams)  # FIFO: a freed slot goes to the longest waiter
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=tls if tls is not None else True),  # bounded by the slots
            timeout=aiohttp.ClientTimeout(total=None, connect=connect, sock_read=read),
            headers={"User-Agent": "dpo-operator/log-followers"},
        )

    def url(self, path: str) -> str:
        return self.configuration.host.rstrip("/") + path

    def options(self) -> dict[str, Any]:
        """Per request: the Authorization header, fetched anew (the client's refresh hook re-reads a rotated
        ServiceAccount token or renews an expired kubeconfig token), the TLS server name and the proxy.

        Key names: kubernetes >= 36 keeps the bearer token under "BearerToken", older clients "authorization";
        the value already carries its scheme ("Bearer …"), as the kubernetes client sends it."""
        configuration = self.configuration
        headers = {}
        token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers["Authorization"] = token
        elif (configuration.username or configuration.password) and (basic := configuration.get_basic_auth_token()):
            headers["Authorization"] = basic
        options: dict[str, Any] = {"headers": headers}
        server_name = getattr(configuration, "tls_server_name", None) or getattr(configuration, "assert_hostname", None)
        if isinstance(server_name, str) and server_name:
            options["server_hostname"] = server_name
        if configuration.proxy and not _bypass_proxy(configuration):
            options["proxy"] = configuration.proxy
            if getattr(configuration, "proxy_headers", None):
                options["proxy_headers"] = configuration.proxy_headers
        return options


class _EventLoop(asyncio.SelectorEventLoop):
    """The followers' loop: asyncio gives every TLS connection a 256 KiB read buffer (sslproto.SSLProtocol.
    max_size), several times what the rest of a stream costs (docs/benchmarks.md, "Log followers"). A log stream
    needs no more than one TLS record (16 KiB) per read. Only this loop's connections are affected, not Kopf's."""

    def _make_ssl_transport(self, *args: Any, **kwargs: Any) -> Any:
        transport = super()._make_ssl_transport(*args, **kwargs)  # type: ignore[misc]  # private (issue 17)
        protocol = getattr(transport, "_ssl_protocol", None)  # nothing has been read yet: reading starts later
        if protocol is not None and len(getattr(protocol, "_ssl_buffer", b"")) > _TLS_READ_BUFFER:
            protocol.max_size = _TLS_READ_BUFFER
            protocol._ssl_buffer = bytearray(_TLS_READ_BUFFER)
            protocol._ssl_buffer_view = memoryview(protocol._ssl_buffer)
        return transport


@dataclass
class _Runtime:
    """One start of the loop: its thread, and what _main created on it."""

    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    api: _Api | None = None
    stopping: asyncio.Event | None = None


class LogFollowers:
    """The followers of one operator process, keyed by pod; their progress outlives their task.

    Called from any thread (reconciles, the resync, Kopf's handlers); the streams themselves run on the
    event loop of the thread LOOP_NAME, started on the first pod to follow.
    """

    give_up_after = 30  # consecutive failed attempts, `retry_seconds` apart (~1 min)
    retry_seconds = 2.0
    connect_timeout = 10.0
    read_timeout = 120.0
    """A stream that delivered nothing for this long is reconnected (sinceSeconds): normal for an idle trainer,
    and how a connection that died without a reset is noticed."""
    beat_seconds = 5.0
    max_silence = 60.0

    def __init__(
        self,
        api: Any,
        mark_dirty: Callable[[str, str], None],
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        health: Health | None = None,
        configuration: client.Configuration | None = None,
    ) -> None:
        """`configuration`: the credentials; by default those of `api`'s ApiClient (the reconciler's Kube), else
        the kubernetes client's default Configuration (what main.py loaded: in-cluster or a kubeconfig)."""
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.api = api
        self.mark_dirty = mark_dirty
        self.max_streams = max_streams
        self.health = health
        self._configuration = configuration
        self._followers: dict[tuple[str, str], _Follower] = {}
        self._owner: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._runtime: _Runtime | None = None
        self._dead_reported = False

    # --- the interface, called from any thread ---------------------------------------------------------
    def ensure(self, namespace: str, dpojob: str, pods: list[dict[str, Any]]) -> None:
        """Follow every running pod of the run not followed yet; forget pods that are gone.

        A container that has already ended is not followed: its outcome and final metrics are in its
        termination message, and re-reading the whole log of every retained pod after an operator restart
        would cost a stream and a full log transfer each."""
        names = {p["metadata"]["name"] for p in pods}
        with self._lock:
            for key in [k for k, owner in self._owner.items() if owner == dpojob and k[0] == namespace]:
                if key[1] not in names:
                    self._followers.pop(key).stop()
                    del self._owner[key]
            for pod in pods:
                key = (namespace, pod["metadata"]["name"])
                previous = self._followers.get(key)
                if previous is not None and (previous.is_alive() or previous.finished):
                    continue
                if not container_state(pod).get("running"):
                    continue
                runtime = self._running()
                if runtime is None or runtime.api is None:
                    return
                # A follower that gave up is replaced, keeping what it read (its replay guard included).
                follower = _Follower(
                    namespace,
                    key[1],
                    lambda: self.mark_dirty(namespace, dpojob),
                    previous.state if previous is not None else None,
                )
                self._followers[key], self._owner[key] = follower, dpojob
                follower.future = asyncio.run_coroutine_threadsafe(self._follow(runtime.api, follower), runtime.loop)

    def latest_progress(self, namespace: str, pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Status fields from the newest pod that reported anything."""
        newest_first = sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)
        with self._lock:
            for pod in newest_first:
                follower = self._followers.get((namespace, pod["metadata"]["name"]))
                if follower is not None:
                    with follower.progress_lock:
                        if follower.state.published is not None:
                            return copy.deepcopy(follower.state.published)
        return None

    def active(self) -> int:
        """Pods being followed: streaming, waiting for a slot or about to reconnect (the log_followers gauge)."""
        with self._lock:
            if self._runtime is None or not self._runtime.thread.is_alive():
                return 0
            return sum(f.is_alive() for f in self._followers.values())

    def open_streams(self) -> int:
        """Followers holding one of the `max_streams` slots right now."""
        with self._lock:
            return sum(f.streaming for f in self._followers.values())

    def forget(self, namespace: str, dpojob: str) -> None:
        """Stop following a deleted DPOJob's pods."""
        self.ensure(namespace, dpojob, [])

    def stop_all(self, timeout: float = 5.0) -> None:
        """Stop every stream and the loop's thread (a later ensure starts a new one)."""
        with self._lock:
            followers = list(self._followers.values())
            runtime, self._runtime = self._runtime, None
        for follower in followers:
            follower.stop()
        if runtime is not None:
            if self.health is not None:
                self.health.unregister(LOOP_NAME)
            if runtime.thread.is_alive() and runtime.stopping is not None:
                runtime.loop.call_soon_threadsafe(runtime.stopping.set)
                runtime.thread.join(timeout)
            elif not runtime.thread.is_alive() and not runtime.loop.is_closed():
                # The thread died with the loop's streams open: close them here (the loop runs nowhere else).
                try:
                    runtime.loop.run_until_complete(self._shutdown(runtime))  # cancelled tasks end at once
                    runtime.loop.close()
                except Exception as exc:
                    log.warning("could not close the streams of the dead %s loop: %s", LOOP_NAME, exc)

    # --- the loop's thread ------------------------------------------------------------------------------
    def _running(self) -> _Runtime | None:
        """The loop, started on first use; None (logged once) when it is not running. Under self._lock."""
        if self._runtime is None:
            self._runtime, self._dead_reported = self._start(), False
        if not self._runtime.thread.is_alive() or self._runtime.api is None:
            if not self._dead_reported:
                self._dead_reported = True
                log.error("the %s event loop is not running: no trainer log is followed (see /healthz)", LOOP_NAME)
            return None
        return self._runtime

    def _start(self) -> _Runtime:
        _raise_open_files_limit(self.max_streams + 1024)
        loop = _EventLoop()
        ready = threading.Event()
        thread = threading.Thread(target=lambda: self._run(runtime, ready), name=LOOP_NAME, daemon=True)
        runtime = _Runtime(loop, thread)
        if self.health is not None:
            self.health.register(LOOP_NAME, self.max_silence, thread)
        thread.start()
        ready.wait(10.0)
        return runtime

    def _run(self, runtime: _Runtime, ready: threading.Event) -> None:
        loop = runtime.loop
        asyncio.set_event_loop(loop)
        # Host name lookups (a kubeconfig naming the server by name) use the loop's executor: a small one.
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{LOOP_NAME}-dns"))
        try:
            loop.run_until_complete(self._main(runtime, ready))
        except BaseException:
            log.exception("the %s event loop ended: no trainer log is followed any more", LOOP_NAME)
            raise
        loop.run_until_complete(self._shutdown(runtime))
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    async def _main(self, runtime: _Runtime, ready: threading.Event) -> None:
        """Connect (on this loop), then beat until stop_all."""
        configuration = self._configuration or _configuration_of(self.api)
        stopping = runtime.stopping = asyncio.Event()
        runtime.api = _Api(configuration, self.max_streams, self.connect_timeout, self.read_timeout)
        ready.set()
        while not stopping.is_set():
            if self.health is not None:
                self.health.beat(LOOP_NAME)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.beat_seconds)

    async def _shutdown(self, runtime: _Runtime) -> None:
        """End every follower (closing its stream), then the session."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if runtime.api is not None:
            await runtime.api.session.close()

    # --- one follower, on the loop ----------------------------------------------------------------------
    async def _follow(self, api: _Api, follower: _Follower) -> None:
        failures = 0
        try:
            while True:
                outcome = await self._attempt(api, follower)
                if outcome == _FINISHED:
                    follower.finished = True
                    return
                failures = failures + 1 if outcome == _FAILED else 0
                if failures >= self.give_up_after:
                    break
                await asyncio.sleep(self.retry_seconds)
        except Exception:  # a bug, not the network: give up like after failures (replaced on the next reconcile)
            log.exception("log follower of %s/%s failed", follower.namespace, follower.pod)
            return
        log.warning(
            "log stream of %s/%s failed %d times in a row (last: %s); retried on the next reconcile",
            follower.namespace,
            follower.pod,
            failures,
            follower.last_error,
        )

    async def _attempt(self, api: _Api, follower: _Follower) -> str:
        """One stream of the log, then (if it ended) whether the container did: finished, reconnect, failed."""
        follower.received = False
        async with api.slots:
            follower.streaming = True
            try:
                ended = await self._stream(api, follower)
                if ended is None:  # idle: the container is still running, nothing to check
                    return _RECONNECT
                if ended or await self._container_ended(api, follower):
                    return _FINISHED
                return _RECONNECT
            except (_StatusError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                follower.last_error = str(exc) or type(exc).__name__
                log.debug("log stream of %s/%s: %s", follower.namespace, follower.pod, follower.last_error)
            finally:
                follower.streaming = False
        return _RECONNECT if follower.received else _FAILED

    async def _stream(self, api: _Api, follower: _Follower) -> bool | None:
        """Fold the log's new progress events until the stream ends. True: the pod is gone (404); False: the
        stream ended (the container may have); None: nothing arrived for read_timeout (an idle trainer)."""
        params = {"container": CONTAINER, "follow": "true"}
        since = follower.state.since_seconds(time.time())
        if since is not None:
            params["sinceSeconds"] = str(since)
        url = api.url(f"/api/v1/namespaces/{follower.namespace}/pods/{follower.pod}/log")
        async with api.session.get(url, params=params, **api.options()) as response:
            if response.status == 404:
                return True
            if response.status != 200:
                raise _StatusError(response.status, await response.content.read(4096))
            splitter = LineSplitter()
            try:
                async for chunk in response.content.iter_any():
                    follower.received = True
                    follower.state.read_until = time.time()
                    if follower.fold(chunk, splitter):
                        follower.progressed(asyncio.get_running_loop())
            except aiohttp.SocketTimeoutError:
                follower.state.read_until = time.time()
                return None
            follower.state.read_until = time.time()
            return False

    async def _container_ended(self, api: _Api, follower: _Follower) -> bool:
        """After a stream ended: has the trainer container terminated (or the pod gone)?"""
        url = api.url(f"/api/v1/namespaces/{follower.namespace}/pods/{follower.pod}")
        options = api.options()
        options["timeout"] = aiohttp.ClientTimeout(total=30.0, connect=api.connect_timeout)
        async with api.session.get(url, **options) as response:
            if response.status == 404:
                return True
            if response.status != 200:
                raise _StatusError(response.status, await response.content.read(4096))
            pod = await response.json()
        if (pod.get("status") or {}).get("phase") in FINISHED_POD_PHASES:
            return True
        statuses = (pod.get("status") or {}).get("containerStatuses") or []
        return any(s.get("name") == CONTAINER and (s.get("state") or {}).get("terminated") for s in statuses)


def _configuration_of(api: Any) -> client.Configuration:
    """A private copy of the credentials the kubernetes client uses (its refresh hook keeps working)."""
    configuration = getattr(getattr(api, "api_client", None), "configuration", None)
    if isinstance(configuration, client.Configuration):
        return copy.deepcopy(configuration)
    return client.Configuration.get_default_copy()


def _bypass_proxy(configuration: client.Configuration) -> bool:
    from kubernetes.client.rest import should_bypass_proxies

    return should_bypass_proxies(configuration.host, getattr(configuration, "no_proxy", None) or "")


def _raise_open_files_limit(wanted: int) -> None:
    """One descriptor per stream: raise the soft limit (often 1024 in containers) towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit to %d: %s", target, exc)
