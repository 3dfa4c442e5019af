"""Log followers against a small local API server (aiohttp) that speaks the pod-log and pod endpoints, so the
real client path runs: streams that die after delivering data, 5xx, followers that give up, endless lines
without a newline, 404, idle streams, hundreds of pods on one thread, the stream bound, a dead event loop,
and the credentials main.py loads (client-certificate and ServiceAccount-token kubeconfigs, in-cluster)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import itertools
import json
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes import client, config
from kubernetes.config.incluster_config import InClusterConfigLoader

from dpo_operator.followers import MAX_LINE_BYTES, PUBLISH_INTERVAL_S, LineSplitter, LogFollowers
from dpo_operator.kube import Kube


def progress_line(step: int) -> bytes:
    event = {"kind": "dpo-trainer/progress", "event": "log", "stage": "dpo", "step": step, "totalSteps": 100}
    return json.dumps({**event, "time": 1000.0 + step}).encode() + b"\n"


def running_pod(name: str, created: str = "2026-01-01T00:00:00Z") -> dict[str, Any]:
    state = {"running": {"startedAt": created}}
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": state}]},
    }


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached"
        time.sleep(0.01)


# --- the local API server --------------------------------------------------------------------------------
@dataclass
class LogRequest:
    """One GET of a pod's log, for a test's script: send chunks, drop the connection, hold the stream open."""

    pod: str
    attempt: int  # this pod's n-th log request, from 1
    query: dict[str, str]
    authorization: str | None
    request: web.Request
    response: web.StreamResponse | None = None
    dropped: bool = False

    @property
    def since(self) -> int | None:
        return int(self.query["sinceSeconds"]) if "sinceSeconds" in self.query else None

    async def send(self, *chunks: bytes) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": "text/plain"})
            await self.response.prepare(self.request)
        for chunk in chunks:
            await self.response.write(chunk)

    async def drop(self) -> None:
        """Close the connection mid-stream (an API server restart), after what was sent has been read: data
        still unread when the connection breaks may be lost to the client (its log replay recovers it)."""
        await asyncio.sleep(0.2)
        self.dropped = True
        assert self.request.transport is not None
        self.request.transport.close()

    async def hold(self, until: threading.Event | None = None) -> None:
        """Keep the stream open, sending nothing, until `until` is set or the client goes away."""
        await self.send()
        while until is None or not until.is_set():
            if self.request.transport is None or self.request.transport.is_closing():
                return
            await asyncio.sleep(0.01)


Script = Callable[[LogRequest], Awaitable[web.StreamResponse | None]]


@dataclass
class FakeApiServer:
    """GET /api/v1/namespaces/{ns}/pods/{pod}/log (answered by `script`) and GET .../pods/{pod} (running unless
    the pod is in `ended` or `gone`). With `tls`, authenticates like an API server: a client certificate
    signed by its CA, or a bearer token in `tokens`; anything else is a 401."""

    script: Script
    tls: ssl.SSLContext | None = None
    tokens: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    log_requests: list[LogRequest] = field(default_factory=list)
    pod_requests: list[str] = field(default_factory=list)
    unauthorized: int = 0
    open_streams: int = 0
    max_open_streams: int = 0
    url: str = ""

    def start(self) -> FakeApiServer:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(started,), name="fake-apiserver", daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def attempts(self, pod: str) -> int:
        return sum(r.pod == pod for r in self.log_requests)

    def _serve(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}/log", self._log)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{pod}", self._pod)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
        self._loop.run_until_complete(site.start())
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        started.set()
        self._loop.run_forever()

    def _authorized(self, request: web.Request) -> bool:
        if self.tls is None:
            return True
        assert request.transport is not None
        if request.transport.get_extra_info("peercert"):
            return True  # verified against the CA during the handshake (CERT_OPTIONAL)
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        return scheme.lower() == "bearer" and token in self.tokens

    async def _log(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            self.unauthorized += 1
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        pod = request.match_info["pod"]
        info = LogRequest(
            pod, self.attempts(pod) + 1, dict(request.query), request.headers.get("Authorization"), request
        )
        self.log_requests.append(info)
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        try:
            answer = await self.script(info)
        finally:
            self.open_streams -= 1
        if answer is not None:
            return answer
        if request.transport is None or request.transport.is_closing():
            raise asyncio.CancelledError  # dropped, or the client went away: nothing left to answer
        await info.send()
        await info.response.write_eof()
        return info.response

    async def _pod(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            self.unauthorized += 1
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        pod = request.match_info["pod"]
        self.pod_requests.append(pod)
        if pod in self.gone:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        if pod in self.ended:
            state, phase = {"terminated": {"exitCode": 0}}, "Succeeded"
        else:
            state, phase = {"running": {}}, "Running"
        return web.json_response(
            {"status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}
        )


def not_found() -> web.Response:
    return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeApiServer]]:
    servers: list[FakeApiServer] = []

    def start(script: Script, **kwargs: Any) -> FakeApiServer:
        servers.append(FakeApiServer(script, **kwargs).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread: what Kopf's loop is to the operator."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-event-loop", daemon=True)
    thread.start()
    yield loop

    async def end_every_task() -> None:  # as the loop's owner does before it stops: streams are closed
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(end_every_task(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def follow(event_loop_thread: asyncio.AbstractEventLoop) -> Iterator[Callable[..., LogFollowers]]:
    """LogFollowers with fast retries on the test's event loop; stopped after the test."""
    made: list[LogFollowers] = []

    def make(
        server: FakeApiServer | None = None,
        *,
        configuration: client.Configuration | None = None,
        give_up_after: int = 3,
        read_timeout: float = 120.0,
        mark_dirty: Callable[[str, str], None] = lambda namespace, name: None,
        **kwargs: Any,
    ) -> LogFollowers:
        if configuration is None and server is not None:
            configuration = client.Configuration(host=server.url)
        followers = LogFollowers(object(), mark_dirty, configuration=configuration, **kwargs)
        followers.give_up_after, followers.retry_seconds, followers.read_timeout = give_up_after, 0.01, read_timeout
        followers.attach(event_loop_thread)
        made.append(followers)
        return followers

    yield make
    for followers in made:
        followers.stop_all()


def step_of(followers: LogFollowers, pod: str) -> int:
    follower = followers._followers.get(("ns", pod))
    return follower.progress.step if follower is not None else -1


# --- failures, replacement, replay ----------------------------------------------------------------------
def test_failures_are_counted_in_a_row_not_in_total(serve, follow) -> None:
    """Every third stream delivers a line and then the connection drops (an API server restart); the others
    get a 503. Never four failures in a row, so never given up, however many there are in total."""

    async def script(r: LogRequest) -> web.StreamResponse | None:
        if r.attempt % 3:
            return web.json_response({"kind": "Status", "code": 503}, status=503)
        await r.send(progress_line(r.attempt))
        await r.drop()
        return None

    server = serve(script)
    followers = follow(server, give_up_after=4)
    followers.ensure("ns", "job", [running_pod("pod")])
    wait_until(lambda: server.attempts("pod") >= 30, what="30 attempts")
    assert followers.active() == 1, "20 failures, never 4 in a row, are no reason to give up"
    wait_until(lambda: step_of(followers, "pod") >= 27, what="step 27")


def test_a_follower_that_gave_up_is_replaced_keeping_its_progress(serve, follow) -> None:
    healthy = threading.Event()

    async def script(r: LogRequest) -> web.StreamResponse | None:
        if r.attempt == 1:
            await r.send(progress_line(5))
            await r.drop()
        elif not healthy.is_set():
            return web.json_response({"kind": "Status", "code": 503, "message": "etcd is  unavailable"}, status=503)
        else:
            await r.send(progress_line(5), progress_line(6))  # a re-read overlaps what was folded
            await r.hold()
        return None

    server = serve(script)
    followers = follow(server, give_up_after=3)
    pod = running_pod("pod")
    followers.ensure("ns", "job", [pod])
    first = followers._followers["ns", "pod"]
    wait_until(lambda: not first.is_alive(), what="giving up")
    assert followers.active() == 0 and not first.finished and first.progress.step == 5
    assert first.last_error == "503: etcd is unavailable", "the API server's Status message, for the log"
    assert server.attempts("pod") == 4, "one stream, then 3 failures in a row"
    healthy.set()
    followers.ensure("ns", "job", [pod])  # the next reconcile
    second = followers._followers["ns", "pod"]
    assert second is not first and second.progress is first.progress
    wait_until(lambda: second.progress.step == 6, what="step 6")
    assert second.progress.events_seen == 2, "the replayed step 5 is skipped, not folded twice"
    wait_until(lambda: followers.latest_progress("ns", [pod])["progress"]["step"] == 6, what="step 6 published")
    replay = server.log_requests[-1]
    assert replay.query["follow"] == "true" and replay.query["container"] == "trainer"
    assert replay.since is not None and 60 < replay.since < 90, "only the last minute or so is re-read"


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


def test_progress_after_an_endless_line_then_the_container_ends(serve, follow) -> None:
    async def script(r: LogRequest) -> None:
        for _ in range(40):  # 2.5 MiB without a newline
            await r.send(b"y" * 65536)
        await r.send(b"\n", progress_line(9))
        server.ended.add(r.pod)  # the stream ends because the container did

    server = serve(script)
    followers = follow(server)
    followers.ensure("ns", "job", [running_pod("pod")])
    follower = followers._followers["ns", "pod"]
    wait_until(lambda: follower.finished, what="finished")
    assert follower.progress.step == 9 and follower.progress.events_seen == 1
    assert server.attempts("pod") == 1 and server.pod_requests == ["pod"] and followers.active() == 0


def test_ended_containers_are_not_followed(serve, follow) -> None:
    """After an operator restart, retained finished pods must not each get a stream re-reading their log."""

    async def script(r: LogRequest) -> None:
        await r.send(progress_line(1))

    server = serve(script)
    followers = follow(server)
    threads = threading.active_count()
    ended = {"phase": "Succeeded", "containerStatuses": [{"state": {"terminated": {"exitCode": 0}}}]}
    followers.ensure("ns", "job", [{"metadata": {"name": f"done-{i}"}, "status": ended} for i in range(50)])
    assert followers.active() == 0 and server.log_requests == []
    assert threading.active_count() == threads, "not even the event loop's thread is started for them"


def test_a_pod_that_is_gone_is_finished_not_retried(serve, follow) -> None:
    """A 404 on the log, or on the pod after its stream ended: nothing more will come."""

    async def script(r: LogRequest) -> web.StreamResponse | None:
        if r.pod == "deleted":
            return not_found()
        await r.send(progress_line(2))
        server.gone.add(r.pod)  # deleted while its stream was open
        return None

    server = serve(script)
    followers = follow(server, give_up_after=30)
    followers.ensure("ns", "job", [running_pod("deleted"), running_pod("deleted-later")])
    wait_until(lambda: all(f.finished for f in followers._followers.values()), what="both finished")
    assert server.attempts("deleted") == 1 and server.attempts("deleted-later") == 1
    assert step_of(followers, "deleted-later") == 2 and followers.active() == 0
    followers.ensure("ns", "job", [running_pod("deleted"), running_pod("deleted-later")])  # a stale pod list
    assert len(server.log_requests) == 2, "a finished follower is not restarted"


def test_an_idle_stream_reconnects_with_since_seconds_and_is_no_failure(serve, follow) -> None:
    """A trainer silent for longer than the read timeout (loading a model): reconnect, re-read only the
    last minute, never count it as a failure, and don't ask for the pod each time."""

    async def script(r: LogRequest) -> None:
        if r.attempt == 1:
            await r.send(progress_line(1))
        await r.hold()

    server = serve(script)
    followers = follow(server, give_up_after=2, read_timeout=0.3)
    followers.ensure("ns", "job", [running_pod("pod")])
    wait_until(lambda: server.attempts("pod") >= 5, what="5 streams")
    assert followers.active() == 1 and step_of(followers, "pod") == 1
    assert server.log_requests[0].since is None, "the first stream reads the log from its start"
    assert all(60 < r.since <= 65 for r in server.log_requests[1:5]), [r.since for r in server.log_requests]
    assert server.pod_requests == []


def test_a_pod_removed_from_the_run_is_no_longer_followed(serve, follow) -> None:
    async def script(r: LogRequest) -> None:
        await r.send(progress_line(1))
        await r.hold()

    server = serve(script)
    followers = follow(server)
    followers.ensure("ns", "job", [running_pod("a"), running_pod("b")])
    wait_until(lambda: server.open_streams == 2)
    followers.ensure("ns", "job", [running_pod("b")])
    wait_until(lambda: server.open_streams == 1, what="a's stream closed")
    followers.forget("ns", "job")
    wait_until(lambda: server.open_streams == 0, what="b's stream closed")
    assert followers.active() == 0


# --- a chatty pod ----------------------------------------------------------------------------------------
def test_a_burst_of_progress_lines_is_published_once_a_second_the_last_within_a_second(serve, follow) -> None:
    """200 progress lines in 2 s, one chunk each: what reconciles read changes at most once a second (so the
    status is written at most that often), each change asks for a reconcile, and the last line is not held
    back longer than the interval."""
    sent: list[float] = []

    async def script(r: LogRequest) -> None:
        for step in range(1, 201):
            await asyncio.sleep(0.01)
            if step == 200:
                sent.append(time.monotonic())
            await r.send(progress_line(step))
        await r.hold()

    server = serve(script)
    pod = running_pod("pod")
    marks: list[tuple[float, int]] = []

    def mark_dirty(namespace: str, name: str) -> None:
        published = followers.latest_progress("ns", [pod])
        marks.append((time.monotonic(), published["progress"]["step"] if published else 0))

    followers = follow(server, mark_dirty=mark_dirty)
    followers.ensure("ns", "job", [pod])
    wait_until(lambda: marks and marks[-1][1] == 200, what="the last step published")
    assert marks[-1][0] - sent[0] <= PUBLISH_INTERVAL_S + 0.3
    changes = [marks[0]] + [mark for before, mark in itertools.pairwise(marks) if mark[1] != before[1]]
    assert 2 <= len(changes) <= 4, changes
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(changes)]
    assert min(gaps) >= PUBLISH_INTERVAL_S - 0.02, gaps
    assert len(marks) <= 2 * len(changes), "a reconcile asked for per publish (and one ahead of it), not per line"


# --- scale: one thread, bounded streams ------------------------------------------------------------------
def test_200_pods_are_followed_without_a_thread_each(serve, follow) -> None:
    async def script(r: LogRequest) -> None:
        await r.send(progress_line(3))
        await r.hold()

    server = serve(script)
    marked: Counter[tuple[str, str]] = Counter()
    followers = follow(server, mark_dirty=lambda namespace, name: marked.update([(namespace, name)]))
    threads = threading.active_count()
    pods = [running_pod(f"pod-{i}") for i in range(200)]
    for i in range(0, 200, 10):  # twenty runs of 10 pods each
        followers.ensure("ns", f"job-{i // 10}", pods[i : i + 10])
    wait_until(lambda: server.open_streams == 200 and followers.open_streams() == 200, what="200 open streams")
    wait_until(lambda: all(step_of(followers, f"pod-{i}") == 3 for i in range(200)), what="200 pods' progress")
    assert followers.active() == 200
    wait_until(lambda: marked.total() == 200, what="200 marks")  # notify follows the fold
    assert marked == {("ns", f"job-{j}"): 10 for j in range(20)}, "each pod's event marks its run for a reconcile"
    assert threading.active_count() - threads <= 2, [t.name for t in threading.enumerate()]
    followers.stop_all()
    wait_until(lambda: server.open_streams == 0, what="all streams closed")
    assert threading.active_count() == threads


def test_at_most_max_streams_are_open_the_others_wait_their_turn(serve, follow) -> None:
    release = {f"pod-{i}": threading.Event() for i in range(12)}

    async def script(r: LogRequest) -> None:
        await r.send(progress_line(1))
        await r.hold(release[r.pod])
        server.ended.add(r.pod)

    server = serve(script)
    followers = follow(server, max_streams=5)
    followers.ensure("ns", "job", [running_pod(name) for name in release])
    wait_until(lambda: server.open_streams == 5, what="5 streams")
    time.sleep(0.3)
    first = {r.pod for r in server.log_requests}
    assert len(server.log_requests) == 5 and len(first) == 5 and server.max_open_streams == 5
    assert followers.active() == 12 and followers.open_streams() == 5, "7 pods wait for a slot"
    for name in sorted(first)[:3]:
        release[name].set()  # three runs end: three waiting pods get their slot
    wait_until(lambda: len(server.log_requests) == 8 and server.open_streams == 5, what="3 more pods followed")
    for event in release.values():
        event.set()
    wait_until(lambda: all(f.finished for f in followers._followers.values()), what="all 12 finished")
    assert server.max_open_streams == 5 and all(step_of(followers, name) == 1 for name in release)
    assert Counter(r.pod for r in server.log_requests) == dict.fromkeys(release, 1), "each pod's log read once"


# --- the event loop -------------------------------------------------------------------------------------
def test_without_a_running_event_loop_nothing_is_followed(serve) -> None:
    """Before main.py attaches Kopf's loop, or after it stopped: no error, no stream, reported as 0 followed."""

    async def script(r: LogRequest) -> None:
        await r.send(progress_line(1))
        await r.hold()

    server = serve(script)
    followers = LogFollowers(
        object(), lambda namespace, name: None, configuration=client.Configuration(host=server.url)
    )
    followers.ensure("ns", "job", [running_pod("pod")])  # not attached yet
    loop = asyncio.new_event_loop()
    followers.attach(loop)  # attached, but the loop does not run (stopped)
    followers.ensure("ns", "job", [running_pod("pod")])
    loop.close()
    assert followers.active() == 0 and followers._followers == {} and server.log_requests == []


# --- credentials: what main.py loads ---------------------------------------------------------------------
@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path

    def server_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(self.server_cert, self.server_key)
        context.verify_mode = ssl.CERT_OPTIONAL  # a client certificate, or else a bearer token
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{ca}.key")
        openssl("req", "-x509", "-new", "-key", f"{ca}.key", "-days", "1", "-subj", f"/CN={ca}", "-out", f"{ca}.crt")
    for name, subject, extension in (
        ("server", "/CN=kube-apiserver", "subjectAltName=IP:127.0.0.1"),
        ("client", "/O=system:masters/CN=admin", "extendedKeyUsage=clientAuth"),
    ):
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
        openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key", d / "other-ca.crt")


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, server: str, cluster: dict[str, Any], user: dict[str, Any]) -> Path:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": server, **cluster}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(yaml.safe_dump(document))
    return path


async def one_line_then_hold(r: LogRequest) -> None:
    await r.send(progress_line(4))
    await r.hold()


@pytest.fixture
def default_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test load credentials into the kubernetes client's default Configuration, as main.py does."""
    monkeypatch.setattr(client.Configuration, "_default", None)


def test_an_admin_client_certificate_kubeconfig(serve, follow, pki, tmp_path, default_configuration) -> None:
    server = serve(one_line_then_hold, tls=pki.server_tls())
    cluster = {"certificate-authority-data": b64(pki.ca)}
    user = {"client-certificate-data": b64(pki.client_cert), "client-key-data": b64(pki.client_key)}
    config.load_kube_config(config_file=str(write_kubeconfig(tmp_path / "admin", server.url, cluster, user)))
    followers = follow(configuration=None)  # main.py loaded it: the default Configuration
    followers.ensure("ns", "job", [running_pod("pod")])
    wait_until(lambda: step_of(followers, "pod") == 4)
    assert server.unauthorized == 0 and server.log_requests[0].authorization is None


def test_a_service_account_token_kubeconfig(
    serve, follow, pki, tmp_path, default_configuration, event_loop_thread
) -> None:
    server = serve(one_line_then_hold, tls=pki.server_tls(), tokens={"sa-token"})
    cluster = {"certificate-authority": str(pki.ca)}
    config.load_kube_config(
        config_file=str(write_kubeconfig(tmp_path / "sa", server.url, cluster, {"token": "sa-token"}))
    )
    followers = LogFollowers(Kube(client.ApiClient()), lambda namespace, name: None)  # as the reconciler
    followers.attach(event_loop_thread)
    try:
        followers.ensure("ns", "job", [running_pod("pod")])
        wait_until(lambda: step_of(followers, "pod") == 4)
    finally:
        followers.stop_all()
        wait_until(lambda: not followers._followers["ns", "pod"].is_alive(), what="stopped")
    assert server.log_requests[0].authorization == "Bearer sa-token" and server.unauthorized == 0


def test_insecure_skip_tls_verify(serve, follow, pki, tmp_path) -> None:
    server = serve(one_line_then_hold, tls=pki.server_tls(), tokens={"t"})
    configuration = client.Configuration()
    kubeconfig = write_kubeconfig(tmp_path / "insecure", server.url, {"insecure-skip-tls-verify": True}, {"token": "t"})
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    followers = follow(configuration=configuration)
    followers.ensure("ns", "job", [running_pod("pod")])
    wait_until(lambda: step_of(followers, "pod") == 4)


def test_a_server_certificate_from_another_ca_is_refused(serve, follow, pki) -> None:
    server = serve(one_line_then_hold, tls=pki.server_tls(), tokens={"t"})
    configuration = client.Configuration(host=server.url, api_key={"BearerToken": "Bearer t"})
    configuration.ssl_ca_cert = str(pki.other_ca)
    followers = follow(configuration=configuration, give_up_after=2)
    followers.ensure("ns", "job", [running_pod("pod")])
    follower = followers._followers["ns", "pod"]
    wait_until(lambda: not follower.is_alive(), what="giving up")
    assert server.log_requests == [] and "certificate verify failed" in follower.last_error


def test_a_log_of_megabytes_streams_intact_through_tls(serve, follow, pki) -> None:
    """TLS is done in memory (ssl.MemoryBIO), 16 KiB at a time: a log of megabytes still arrives intact."""

    async def script(r: LogRequest) -> None:
        for _ in range(40):
            await r.send(b"z" * 65536)
        await r.send(b"\n", b"noise\n" * 10_000, progress_line(9))
        server.ended.add(r.pod)

    server = serve(script, tls=pki.server_tls(), tokens={"t"})
    configuration = client.Configuration(host=server.url, api_key={"BearerToken": "Bearer t"})
    configuration.ssl_ca_cert = str(pki.ca)
    followers = follow(configuration=configuration)
    followers.ensure("ns", "job", [running_pod("pod")])
    follower = followers._followers["ns", "pod"]
    wait_until(lambda: follower.finished, what="finished")
    assert follower.progress.step == 9


def test_in_cluster_credentials_follow_a_rotated_token(serve, follow, pki, tmp_path) -> None:
    """The projected ServiceAccount token is rotated on disk; the client's refresh hook re-reads it."""
    rotated = threading.Event()

    async def script(r: LogRequest) -> None:
        await r.send(progress_line(r.attempt))
        if r.attempt == 1:
            await r.hold(rotated)
            await r.drop()
        else:
            await r.hold()

    server = serve(script, tls=pki.server_tls(), tokens={"old"})
    token = tmp_path / "token"
    token.write_text("old")
    port = server.url.rsplit(":", 1)[1]
    loader = InClusterConfigLoader(
        str(token), str(pki.ca), environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
    )
    loader._token_refresh_period = datetime.timedelta(0)  # the kubelet rotates hourly; the client re-reads each minute
    configuration = client.Configuration()
    loader.load_and_set(configuration)
    followers = follow(configuration=configuration)
    followers.ensure("ns", "job", [running_pod("pod")])
    wait_until(lambda: step_of(followers, "pod") == 1)
    token.write_text("new")
    server.tokens = {"new"}  # the old token is no longer accepted
    rotated.set()
    wait_until(lambda: step_of(followers, "pod") == 2, what="progress over the new token")
    assert server.log_requests[-1].authorization == "bearer new" and server.unauthorized == 0
