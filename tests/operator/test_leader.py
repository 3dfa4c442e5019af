"""Leader election on a real Lease: one leader at a time, a standby waits, a clean release hands over at once."""

from __future__ import annotations

import threading
import time
import uuid

from dpo_operator.health import Health
from dpo_operator.leader import LeaderElector
from dpo_operator.settings import OperatorSettings


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
