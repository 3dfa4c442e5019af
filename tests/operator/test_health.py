"""/healthz and /readyz over real HTTP: a dead or stalled background loop turns the replica unhealthy.

The resync loop is driven with a Kube stand-in whose relist fails the way a real outage does (urllib3's
MaxRetryError, not an ApiException): the loop must survive it (it used to die for good, invisibly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from urllib3.exceptions import MaxRetryError

from dpo_operator import __version__, health, metrics
from dpo_operator.cache import ObjectCache
from dpo_operator.manifests import ServerFeatures
from dpo_operator.reconciler import Reconciler
from dpo_operator.settings import OperatorSettings
from dpo_operator.workqueue import Resync, WorkQueue


def get(server: object, path: str) -> tuple[int, dict | str]:
    host, port = server.server_address[:2]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
            code, body = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read().decode()
    return code, (json.loads(body) if body.startswith("{") else body)


class LoopServer:
    """health.serve on an event loop in a thread of its own: the operator's event loop, here."""

    def __init__(self, status: health.Health, **kwargs: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-event-loop", daemon=True)
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(health.serve(status, "127.0.0.1", 0, **kwargs), self.loop)
        self.server = started.result(10)
        self.server_address = self.server.server_address

    def shutdown(self) -> None:
        async def close() -> None:  # the server, then what its connections' handlers still do
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def served() -> Iterator[tuple[health.Health, LoopServer]]:
    status = health.Health()
    server = LoopServer(status)
    yield status, server
    server.shutdown()


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


class FailingKube:
    """Lists fail like an unreachable API server; `crash` makes the next list raise what no handler catches."""

    def __init__(self) -> None:
        self.core = SimpleNamespace()
        self.lists = 0
        self.crash = threading.Event()

    def post_event(self, *event: object) -> None:
        """Nothing to post: no DPOJob is ever reconciled here."""

    def list_all(self, kind: str, namespaces: list[str], **_: object) -> tuple[list[dict], str]:
        self.lists += 1
        if self.crash.is_set():
            raise SystemExit("simulated bug escaping the loop")
        raise MaxRetryError(None, "/apis/dpo-operator.io/v1alpha1/dpojobs", "Connection refused")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the killed loop's exit
def test_resync_survives_connection_errors_and_a_killed_loop_turns_healthz_red(served, monkeypatch) -> None:
    status, server = served
    kube = FailingKube()
    monkeypatch.setattr(Resync, "RELIST_EVERY", 1)
    settings = OperatorSettings(resync_seconds=0.05, workers=2)
    reconciler = Reconciler(kube, ObjectCache(), WorkQueue(), settings, status, ServerFeatures())
    errors_before = metrics.RESYNC_ERRORS._value.get()
    reconciler.start()
    try:
        wait_until(lambda: kube.lists >= 3)
        assert get(server, "/healthz") == (200, {"ok": True, "problems": []}), "connection errors are retried"
        assert metrics.RESYNC_ERRORS._value.get() - errors_before >= 3
        kube.crash.set()
        wait_until(lambda: get(server, "/healthz")[0] == 500)
        assert get(server, "/healthz")[1]["problems"] == [f"{Resync.name}: its thread has exited"]
    finally:
        reconciler.stop()


def test_a_stalled_loop_turns_healthz_red_and_readyz_waits_for_start(served) -> None:
    status, server = served
    assert get(server, "/readyz") == (500, {"ok": False, "problems": ["starting"]})
    status.ready.set()
    stalled = threading.Event()
    thread = threading.Thread(target=stalled.wait, daemon=True)
    thread.start()
    status.register("stuck", max_silence=0.2, thread=thread)
    assert get(server, "/healthz")[0] == 200 and get(server, "/readyz")[0] == 200
    time.sleep(0.3)
    code, body = get(server, "/healthz")
    assert code == 500 and body["problems"][0].startswith("stuck: no progress for")
    assert get(server, "/readyz")[0] == 500, "an unhealthy replica is not ready either"
    status.beat("stuck")
    assert get(server, "/healthz")[0] == 200
    stalled.set()


def test_metrics_are_served_in_prometheus_format(served) -> None:
    _, server = served
    metrics.record_rewards("ns", "job", {"accuracies": 0.75, "margins": 0.5})
    code, text = get(server, "/metrics")
    assert code == 200
    assert 'dpo_operator_dpojob_rewards_accuracies{name="job",namespace="ns"} 0.75' in text
    metrics.forget_dpojob("ns", "job")
    assert 'namespace="ns"' not in get(server, "/metrics")[1], "a deleted DPOJob's series go with it"


def closed_by_peer(sock: socket.socket) -> bool:
    """The server closed this client socket (EOF or reset waiting to be read)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_take_no_thread_are_closed_after_the_timeout_and_probes_still_answer() -> None:
    status = health.Health()
    server = LoopServer(status, timeout=1.0, max_connections=20)
    idle: list[socket.socket] = []
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(server.server_address[:2]) for _ in range(50)]
        assert get(server, "/healthz")[0] == 200, "a probe is answered while 50 sockets sit idle"
        assert threading.active_count() <= threads, "an idle connection holds no thread"
        wait_until(lambda: sum(map(closed_by_peer, idle)) >= 31)
        still_open = [sock for sock in idle if not closed_by_peer(sock)]
        assert len(still_open) == 19, "beyond 20 connections (the probe's included) the oldest are closed"
        wait_until(lambda: all(map(closed_by_peer, still_open)), timeout=3.0)
        assert get(server, "/healthz")[0] == 200, "and the endpoint still serves after the timeouts"
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()


def test_a_slow_client_is_closed_after_the_timeout_even_while_it_sends() -> None:
    server = LoopServer(health.Health(), timeout=1.0)
    slow = socket.create_connection(server.server_address[:2])
    try:
        started = time.monotonic()
        while not closed_by_peer(slow) and time.monotonic() - started < 5:
            with contextlib.suppress(OSError):
                slow.send(b"X")  # a header byte every 0.2 s: never a whole request
            time.sleep(0.2)
        assert 1.0 <= time.monotonic() - started < 2.0, "the whole request must come within the timeout"
    finally:
        slow.close()
        server.shutdown()


def test_per_dpojob_series_off_exports_no_series_labelled_by_a_dpojob(served) -> None:
    _, server = served
    metrics.record_rewards("team-a", "before", {"accuracies": 0.75})
    metrics.per_dpojob_series(False)
    try:
        metrics.record_rewards("team-a", "secret-project", {"accuracies": 0.75, "margins": 0.5})
        code, text = get(server, "/metrics")
        assert code == 200 and "dpo_operator_reconcile_total" in text, "the operator-wide series stay"
        assert "namespace=" not in text and "team-a" not in text and "rewards" not in text
    finally:
        metrics.per_dpojob_series(True)
    metrics.record_rewards("team-a", "after", {"accuracies": 0.5})
    assert 'dpo_operator_dpojob_rewards_accuracies{name="after",namespace="team-a"} 0.5' in get(server, "/metrics")[1]
    metrics.forget_dpojob("team-a", "after")


def test_metrics_carry_process_build_info_and_the_work_queue_without_created_series(served) -> None:
    _, server = served
    queue = WorkQueue()
    collector = metrics.StateCollector(list, lambda: 0, queue.depths)
    metrics.REGISTRY.register(collector)
    try:
        queue.add(("ns", "new"), urgent=True)
        queue.add(("ns", "a"))
        queue.add(("ns", "b"))
        text = get(server, "/metrics")[1]
        assert 'dpo_operator_workqueue_depth{lane="urgent"} 1.0' in text
        assert 'dpo_operator_workqueue_depth{lane="ready"} 2.0' in text
        before = metrics.REGISTRY.get_sample_value(
            "dpo_operator_workqueue_queue_duration_seconds_count", {"lane": "urgent"}
        )
        assert queue.get(timeout=1) == ("ns", "new")
        after = metrics.REGISTRY.get_sample_value(
            "dpo_operator_workqueue_queue_duration_seconds_count", {"lane": "urgent"}
        )
        assert after == (before or 0) + 1
        text = get(server, "/metrics")[1]
    finally:
        metrics.REGISTRY.unregister(collector)
    assert 'dpo_operator_workqueue_depth{lane="urgent"} 0.0' in text
    assert f'dpo_operator_build_info{{version="{__version__}"}} 1.0' in text
    assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    assert "python_info{" in text
    assert "dpo_operator_workqueue_queue_duration_seconds_bucket" in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert "dpo_operator_reconcile_total" in names
    assert not [name for name in names if name.endswith("_created")], "no _created series"
