"""Leader election on a coordination.k8s.io Lease, so two replicas never reconcile at once.

The kubernetes client's LeaderElection does the Lease protocol (client-go's rules: a holder renews every
retry period; a candidate takes over once the record has not changed for a whole lease duration). Around it:

* errors of any kind (connection refused, 5xx) count as a failed attempt instead of killing the thread;
* the leader gives up by exiting the process when it cannot renew within the renew deadline, which is shorter
  than the lease duration: it has stopped before a standby may start (client-go does the same);
* a clean shutdown releases the Lease, so a rolling update hands over at once instead of after the lease.

Why not Kopf peering: a paused Kopf operator still runs our own background loops, and peering freezes both
replicas when their priorities tie; a Lease is what every Kubernetes controller uses and operators know.
"""

from __future__ import annotations

import logging
import os
import threading

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from . import metrics
from .health import Health
from .settings import OperatorSettings

log = logging.getLogger(__name__)
logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every retry of a standby at INFO

LOOP = "leader-election"


class _Election(leaderelection.LeaderElection):
    """The library's election with every error counted as a failed attempt."""

    def __init__(self, config: electionconfig.Config, health: Health) -> None:
        super().__init__(config)
        self.health = health
        self.released = threading.Event()

    def try_acquire_or_renew(self) -> bool:
        self.health.beat(LOOP)
        if self.released.is_set():
            return False
        try:
            return super().try_acquire_or_renew()
        except Exception as exc:  # e.g. urllib3 MaxRetryError while the API server is unreachable
            log.warning("lease %s: %s", self.election_config.lock.name, exc)
            return False


class LeaderElector:
    """Blocks in acquire() until this replica leads, then renews in a thread; losing the Lease ends the process."""

    def __init__(self, settings: OperatorSettings, health: Health, api_client: client.ApiClient | None = None) -> None:
        self.settings, self.health = settings, health
        self.lock = LeaseLock(settings.lease_name, settings.lease_namespace, settings.identity)
        self.lock.api_instance = client.CoordinationV1Api(api_client)
        config = electionconfig.Config(
            self.lock,
            lease_duration=settings.lease_duration,
            renew_deadline=settings.renew_deadline,
            retry_period=settings.retry_period,
            onstarted_leading=lambda: None,
            onstopped_leading=None,
        )
        self.election = _Election(config, health)

    def acquire(self) -> None:
        """Wait as a standby until the Lease is ours."""
        self.health.register(LOOP, max_silence=10 * self.settings.retry_period + 30)
        log.info("%s waits for lease %s/%s", self.settings.identity, self.lock.namespace, self.lock.name)
        self.election.acquire()
        metrics.LEADER.set(1)
        log.info("%s leads (lease %s/%s)", self.settings.identity, self.lock.namespace, self.lock.name)
        thread = threading.Thread(target=self._renew, name="dpo-lease", daemon=True)
        thread.start()
        self.health.register(LOOP, max_silence=self.settings.renew_deadline + 30, thread=thread)

    def _renew(self) -> None:
        self.election.renew_loop()
        if self.election.released.is_set():
            return
        metrics.LEADER.set(0)
        log.critical("lost lease %s/%s: exiting so that only the new leader reconciles", *self._where())
        logging.shutdown()
        os._exit(1)

    def release(self) -> None:
        """Hand the Lease over at once (on a clean shutdown): an empty holder may be taken without waiting."""
        self.election.released.set()
        metrics.LEADER.set(0)
        try:
            lease = self.lock.api_instance.read_namespaced_lease(self.lock.name, self.lock.namespace)
            if lease.spec.holder_identity == self.settings.identity:
                lease.spec.holder_identity = None
                self.lock.api_instance.replace_namespaced_lease(self.lock.name, self.lock.namespace, lease)
                log.info("released lease %s/%s", *self._where())
        except (ApiException, OSError) as exc:
            log.warning("could not release lease %s/%s (it expires by itself): %s", *self._where(), exc)

    def _where(self) -> tuple[str, str]:
        return self.lock.namespace, self.lock.name
