"""Leader election: on a real Lease, one leader at a time, a standby waits, a clean release hands over at once;
without a cluster, a hung API server cannot hold the leader past its renew deadline, and a clean stop hands the
Lease over only after the reconciles in flight (bounded)."""

from __future__ import annotations

import functools
import socket
import threading
import time
import uuid

import kopf
from kubernetes import client

from dpo_operator import main
from dpo_operator.health import Health
from dpo_operator.leader import LeaderElector
from dpo_operator.settings import OperatorSettings
from dpo_operator.workqueue import WorkQueue


def elector(api_client: object, namespace: str, identity: str, lease: str) -> LeaderElector:
    settings = OperatorSettings(
        leader_election=True,
        lease_name=lease,
        lease_namespace=namespace,
        identity=identity,
        lease_duration=4,
        renew_deadline=3,
        retry_period=1,
    )
    return LeaderElector(settings, Health(), api_client)


def test_one_leader_standby_waits_and_takes_over_on_release(api_client: object, namespace: str) -> None:
    lease = f"lease-{uuid.uuid4().hex[:6]}"
    first, second = elector(api_client, namespace, "first", lease), elector(api_client, namespace, "second", lease)
    first.acquire()
    assert first.lock.api_instance.read_namespaced_lease(lease, namespace).spec.holder_identity == "first"
    leading = threading.Event()
    threading.Thread(target=lambda: (second.acquire(), leading.set()), daemon=True).start()
    assert not leading.wait(3 * first.settings.lease_duration), "the standby must wait while the leader renews"
    assert first.health.problems() == [] and second.health.problems() == []
    released = time.monotonic()
    first.release()
    assert leading.wait(10), "the standby takes a released Lease"
    assert time.monotonic() - released < first.settings.lease_duration, "a release hands over without the wait"
    assert second.lock.api_instance.read_namespaced_lease(lease, namespace).spec.holder_identity == "second"
    time.sleep(2 * first.settings.retry_period)
    holder = second.lock.api_instance.read_namespaced_lease(lease, namespace).spec.holder_identity
    assert holder == "second", "the released leader must not take the Lease back"
    second.release()


def settings_of(**overrides: object) -> OperatorSettings:
    timing = {"lease_duration": 4, "renew_deadline": 3, "retry_period": 1}
    return OperatorSettings(
        leader_election=True, lease_name="l", lease_namespace="ns", identity="me", **timing, **overrides
    )


def test_a_hung_api_server_ends_the_renewal_within_the_renew_deadline(
    silent_server: tuple[str, list[socket.socket]],
) -> None:
    url, connections = silent_server
    settings = settings_of()
    leader = LeaderElector(settings, Health(), client.ApiClient(client.Configuration(host=url)))
    ended = threading.Event()
    threading.Thread(target=lambda: (leader.election.renew_loop(), ended.set()), daemon=True).start()
    started = time.monotonic()
    assert ended.wait(settings.renew_deadline + 1), "a hung request held the leader past its renew deadline"
    assert time.monotonic() - started >= settings.renew_deadline - settings.retry_period
    assert len(connections) >= 2, "one hung request must not use up the whole renew deadline"


class FakeLease:
    """The Lease as release() reads and writes it; records when the holder was cleared."""

    timeout = 1.0

    def __init__(self, holder: str) -> None:
        self.lease = client.V1Lease(spec=client.V1LeaseSpec(holder_identity=holder))
        self.released_at: float | None = None

    def read_namespaced_lease(self, name: str, namespace: str, **_: object) -> client.V1Lease:
        return self.lease

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease, **_: object) -> None:
        self.released_at = time.monotonic()


def stopping_leader(queue: WorkQueue, drain_seconds: float) -> tuple[LeaderElector, FakeLease]:
    """A leader wired as main.cli wires it, reconciling from `queue`."""
    leader = LeaderElector(
        settings_of(drain_seconds=drain_seconds),
        Health(),
        stop_work=functools.partial(main.stop_reconciling, kopf.Memo(queue=queue)),
    )
    leader.api = FakeLease("me")
    return leader, leader.api


def test_a_clean_stop_takes_no_more_work_and_releases_the_lease_after_the_reconciles_in_flight() -> None:
    queue = WorkQueue()
    queue.add(("ns", "running"))
    queue.add(("ns", "waiting"))
    in_flight = queue.get(timeout=1)
    leader, lease = stopping_leader(queue, drain_seconds=10)
    releasing = threading.Thread(target=leader.release, daemon=True)
    releasing.start()
    time.sleep(0.5)
    assert lease.released_at is None, "released while a reconcile was still writing"
    assert queue.get(timeout=0.1) is None, "a stopping leader takes no more work"
    finished = time.monotonic()
    queue.done(in_flight)
    releasing.join(2)
    assert lease.released_at is not None and lease.released_at >= finished
    assert lease.lease.spec.holder_identity is None


def test_a_reconcile_that_does_not_end_delays_the_release_by_drain_seconds_only() -> None:
    queue = WorkQueue()
    queue.add(("ns", "stuck"))
    queue.get(timeout=1)
    leader, lease = stopping_leader(queue, drain_seconds=0.5)
    started = time.monotonic()
    leader.release()
    assert lease.released_at is not None and 0.5 <= lease.released_at - started < 1.5
