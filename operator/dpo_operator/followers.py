"""Follow trainer pod logs and fold their progress events, so metrics reach status within seconds.

Why the pod log: trainer pods then need no Kubernetes API rights at all (their token is not even mounted),
the channel works on every cluster version, and `kubectl logs` shows users the same lines.

How: every running trainer pod's log is one HTTP stream (`GET .../pods/<pod>/log?follow=true`, proxied by the
API server from the kubelet), read by an asyncio task on Kopf's event loop (main.py attaches it at start-up:
the operator's concurrency is Kopf's loop and the worker threads, see reconciler.py). So 1,000 running jobs
cost 1,000 sockets and 1,000 small tasks, not 1,000 OS threads; a finished pod costs nothing. Each stream is
plain HTTP/1.1 (h11) over asyncio's streams with TLS from ssl.MemoryBIO (_Connection says why), with the
kubernetes client's own credentials (its Configuration: CA, client certificate, refreshed bearer token, proxy).
A stream's work on the loop is a read and a JSON parse per progress line; the heavy part (the status write)
happens on a worker thread, so Kopf's watches do not wait behind the streams.

Bounded: at most `max_streams` log streams are open at once (DEFAULT_MAX_STREAMS). Further pods wait, in
order, for a slot and are followed once one frees (a pod ends, or an idle stream reconnects and queues up
behind them); a waiting pod's final metrics still arrive in its termination message, and when its turn comes
the log is read from its start, so nothing it printed is lost.

Rate-limited: a pod prints as fast as it likes, but its progress is published (what reconciles read) at most
once per PUBLISH_INTERVAL_S, each publish asking for one reconcile, so its DPOJob's status is written at most
that often for progress, whatever else triggers reconciles meanwhile (the watch event of each status write
does); the newest progress is published when the interval ends, so none is held back longer.

Health: the streams live on Kopf's loop, which main.py's beat registers with /healthz (a stalled or dead loop
fails it); a follower task that fails is replaced on its DPOJob's next reconcile.
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
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from kubernetes import client

from dpojob_api.vocabulary import FINISHED_POD_PHASES

from .manifests import CONTAINER
from .progress import TrainerProgress, parse_line
from .status import container_state

log = logging.getLogger(__name__)
_REPLAY_MARGIN = 60  # seconds of log re-read on reconnect, against delivery delays (both ends use our clock)
MAX_LINE_BYTES = 64 * 1024
"""Longer lines are dropped unread: a progress event is < 4 KiB, and an endless line must not grow memory."""
DEFAULT_MAX_STREAMS = 1000
"""Log streams open at once. Why 1,000: it follows 1,000 concurrently running jobs (one running pod each), the
scale the operator is sized for, without any waiting, within the chart's memory limit. What one stream costs:
on the API server a long-running request (exempt from --max-requests-inflight and priority-and-fairness seats)
plus a kubelet connection it proxies, a few per node; here one socket (a file descriptor: the soft
RLIMIT_NOFILE is raised to fit), h11 and task state, OpenSSL's per-connection state and the read buffer
(see _Connection; the measured cost is in docs/benchmarks.md, "Log followers"). Beyond the bound, memory (and the
kubelets' and API server's work) would grow without a limit with the number of running pods; pods beyond it
wait their turn instead."""
PUBLISH_INTERVAL_S = 1.0
"""A pod's progress reaches status at most this often (docs/operator.md promises one write a second)."""
_MAX_POD_BYTES = 1024 * 1024
"""A pod object is a few KiB; more is not read."""
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


class _Connection:
    """One connection to the API server: TCP from asyncio's streams, TLS from ssl.MemoryBIO.

    Why not asyncio's TLS transport: it reads through a 256 KiB buffer per connection, several times what the
    rest of a log stream costs (docs/benchmarks.md, "Log followers"), and has no public way to shrink it. Here a
    read takes at most READ_BYTES (one TLS record is at most 16 KiB) and nothing else is buffered."""

    READ_BYTES = 16 * 1024

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None, name: str
    ) -> None:
        self.reader, self.writer = reader, writer
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = tls.wrap_bio(self._incoming, self._outgoing, server_hostname=name) if tls else None

    async def handshake(self) -> None:
        if self._tls is not None:
            await self._through_tls(self._tls.do_handshake)

    async def send(self, data: bytes) -> None:
        if self._tls is None:
            self.writer.write(data)
        else:
            await self._through_tls(self._tls.write, data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        """What arrived next (at most READ_BYTES); b"" once the server has closed the connection."""
        if self._tls is None:
            return await self.reader.read(self.READ_BYTES)
        try:
            return await self._through_tls(self._tls.read, self.READ_BYTES)  # type: ignore[no-any-return]
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""

    def close(self) -> None:
        self.writer.close()

    async def _through_tls(self, operation: Callable[..., Any], *args: Any) -> Any:
        """Run a TLS operation, moving bytes between the socket and OpenSSL's memory buffers until it is done."""
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                await self.writer.drain()
                data = await self.reader.read(self.READ_BYTES)
                if data:
                    self._incoming.write(data)
                else:
                    self._incoming.write_eof()
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.writer.write(self._outgoing.read())


class _Response:
    """An HTTP/1.1 response read with h11 (chunked or not), its body in pieces as they arrive."""

    def __init__(self, connection: _Connection, http: h11.Connection, read_timeout: float) -> None:
        self.connection, self.http, self.read_timeout = connection, http, read_timeout
        self.status = 0

    async def start(self) -> None:
        event = await self._next()
        if not isinstance(event, h11.Response):
            raise h11.RemoteProtocolError(f"expected a response, got {type(event).__name__}")
        self.status = event.status_code

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; TimeoutError when nothing arrived for read_timeout."""
        while isinstance(event := await self._next(), h11.Data):
            yield bytes(event.data)

    async def body(self, limit: int) -> bytes:
        """The whole body, at most `limit` bytes kept."""
        parts, size = [], 0
        async for chunk in self.chunks():
            if size < limit:
                parts.append(chunk[: limit - size])
                size += len(parts[-1])
        return b"".join(parts)

    async def _next(self) -> Any:
        while (event := self.http.next_event()) is h11.NEED_DATA:
            async with asyncio.timeout(self.read_timeout):
                self.http.receive_data(await self.connection.receive())
        return event


class _Api:
    """The followers' side of the API server: the kubernetes client's credentials, the stream slots, and GET."""

    def __init__(self, configuration: client.Configuration, max_streams: int, connect: float, read: float) -> None:
        self.configuration = configuration
        self.tls = ssl_context(configuration)
        url = urllib.parse.urlsplit(configuration.host)
        if not url.hostname:
            raise ValueError(f"no host in the API server URL {configuration.host!r}")
        self.host, self.port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
        self.authority, self.base_path = url.netloc.rpartition("@")[2], url.path.rstrip("/")
        self.proxy = None
        if configuration.proxy and not _bypass_proxy(configuration):
            self.proxy = urllib.parse.urlsplit(configuration.proxy)
        self.connect_timeout, self.read_timeout = connect, read
        self.slots = asyncio.Semaphore(max_streams)  # FIFO: a freed slot goes to the longest waiter

    @contextlib.asynccontextmanager
    async def get(
        self, path: str, params: dict[str, str] | None = None, read_timeout: float | None = None
    ) -> AsyncIterator[_Response]:
        """GET `path` on a new connection, closed on leaving the block."""
        async with asyncio.timeout(self.connect_timeout):
            connection = await self._connect()
        try:
            http = h11.Connection(h11.CLIENT)
            target = self.base_path + path + (f"?{urllib.parse.urlencode(params)}" if params else "")
            request = h11.Request(method="GET", target=target, headers=[("Host", self.authority), *self._headers()])
            await connection.send(http.send(request) + (http.send(h11.EndOfMessage()) or b""))
            response = _Response(connection, http, read_timeout or self.read_timeout)
            await response.start()
            yield response
        finally:
            connection.close()

    def _headers(self) -> list[tuple[str, str]]:
        """The Authorization header, fetched anew per request (the client's refresh hook re-reads a rotated
        ServiceAccount token or renews an expired kubeconfig token).

        Key names: kubernetes >= 36 keeps the bearer token under "BearerToken", older clients "authorization";
        the value already carries its scheme ("Bearer …"), as the kubernetes client sends it."""
        configuration = self.configuration
        headers = [("User-Agent", "dpo-operator/log-followers"), ("Accept", "application/json, */*")]
        token = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        if token:
            headers.append(("Authorization", token))
        elif (configuration.username or configuration.password) and (basic := configuration.get_basic_auth_token()):
            headers.append(("Authorization", basic))
        return headers

    async def _connect(self) -> _Connection:
        configuration = self.configuration
        server_name = getattr(configuration, "tls_server_name", None) or getattr(configuration, "assert_hostname", None)
        name = server_name if isinstance(server_name, str) and server_name else self.host
        if self.proxy is None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        else:
            reader, writer = await self._tunnel()
        connection = _Connection(reader, writer, self.tls, name)
        try:
            await connection.handshake()
        except BaseException:
            connection.close()
            raise
        return connection

    async def _tunnel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An HTTP CONNECT tunnel through the configured proxy (kubeconfig proxy-url)."""
        assert self.proxy is not None and self.proxy.hostname
        reader, writer = await asyncio.open_connection(self.proxy.hostname, self.proxy.port or 80)
        http = h11.Connection(h11.CLIENT)
        authority = f"{self.host}:{self.port}"
        extra = list((getattr(self.configuration, "proxy_headers", None) or {}).items())
        writer.write(http.send(h11.Request(method="CONNECT", target=authority, headers=[("Host", authority), *extra])))
        while (event := http.next_event()) is h11.NEED_DATA:
            http.receive_data(await reader.read(4096))
        if not isinstance(event, h11.Response) or event.status_code != 200:
            writer.close()
            raise OSError(f"proxy {self.proxy.hostname} refused CONNECT: {getattr(event, 'status_code', event)}")
        leftover, _ = http.trailing_data
        if leftover:
            reader.feed_data(leftover)  # already read from the socket: the server's first bytes
        return reader, writer


class LogFollowers:
    """The followers of one operator process, keyed by pod; their progress outlives their task.

    Called from any thread (reconciles, the resync, Kopf's handlers); the streams run as tasks on the event loop
    given to attach() (Kopf's, at start-up); until then nothing is followed.
    """

    give_up_after = 30  # consecutive failed attempts, `retry_seconds` apart (~1 min)
    retry_seconds = 2.0
    connect_timeout = 10.0
    read_timeout = 120.0
    """A stream that delivered nothing for this long is reconnected (sinceSeconds): normal for an idle trainer,
    and how a connection that died without a reset is noticed."""

    def __init__(
        self,
        api: Any,
        mark_dirty: Callable[[str, str], None],
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        configuration: client.Configuration | None = None,
    ) -> None:
        """`configuration`: the credentials; by default those of `api`'s ApiClient (the reconciler's Kube), else
        the kubernetes client's default Configuration (what main.py loaded: in-cluster or a kubeconfig)."""
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        self.api = api
        self.mark_dirty = mark_dirty
        self.max_streams = max_streams
        self._configuration = configuration
        self._followers: dict[tuple[str, str], _Follower] = {}
        self._owner: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: _Api | None = None
        self._dead_reported = False

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the streams on `loop` from now on (main.py gives Kopf's at start-up)."""
        _raise_open_files_limit(self.max_streams + 1024)
        configuration = self._configuration or _configuration_of(self.api)
        with self._lock:
            self._api = _Api(configuration, self.max_streams, self.connect_timeout, self.read_timeout)
            self._loop, self._dead_reported = loop, False

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
                if not self._running():
                    return
                assert self._loop is not None and self._api is not None
                # A follower that gave up is replaced, keeping what it read (its replay guard included).
                follower = _Follower(
                    namespace,
                    key[1],
                    lambda: self.mark_dirty(namespace, dpojob),
                    previous.state if previous is not None else None,
                )
                self._followers[key], self._owner[key] = follower, dpojob
                follower.future = asyncio.run_coroutine_threadsafe(self._follow(self._api, follower), self._loop)

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
            if self._loop is None or self._loop.is_closed():
                return 0
            return sum(f.is_alive() for f in self._followers.values())

    def open_streams(self) -> int:
        """Followers holding one of the `max_streams` slots right now."""
        with self._lock:
            return sum(f.streaming for f in self._followers.values())

    def forget(self, namespace: str, dpojob: str) -> None:
        """Stop following a deleted DPOJob's pods."""
        self.ensure(namespace, dpojob, [])

    def stop_all(self) -> None:
        """Stop every stream (each closes its connection as its task ends); a later ensure starts new ones."""
        with self._lock:
            followers = list(self._followers.values())
        for follower in followers:
            follower.stop()

    def _running(self) -> bool:
        """Whether there is a loop to run streams on (logged once when there is none). Under self._lock."""
        if self._loop is not None and self._loop.is_running():
            return True
        if not self._dead_reported:
            self._dead_reported = True
            log.error("no running event loop for the log followers: no trainer log is followed (see /healthz)")
        return False

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
            except (_StatusError, h11.ProtocolError, OSError, TimeoutError, ValueError) as exc:
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
        async with api.get(f"/api/v1/namespaces/{follower.namespace}/pods/{follower.pod}/log", params) as response:
            if response.status == 404:
                return True
            if response.status != 200:
                raise _StatusError(response.status, await response.body(4096))
            splitter = LineSplitter()
            try:
                async for chunk in response.chunks():
                    follower.received = True
                    follower.state.read_until = time.time()
                    if follower.fold(chunk, splitter):
                        follower.progressed(asyncio.get_running_loop())
            except TimeoutError:
                follower.state.read_until = time.time()
                return None
            follower.state.read_until = time.time()
            return False

    async def _container_ended(self, api: _Api, follower: _Follower) -> bool:
        """After a stream ended: has the trainer container terminated (or the pod gone)?"""
        async with asyncio.timeout(30.0):
            async with api.get(f"/api/v1/namespaces/{follower.namespace}/pods/{follower.pod}") as response:
                body = await response.body(_MAX_POD_BYTES)
        if response.status == 404:
            return True
        if response.status != 200:
            raise _StatusError(response.status, body[:4096])
        pod = json.loads(body)
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
