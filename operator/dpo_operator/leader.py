"""Leader election on a coordination.k8s.io Lease, so two replicas never reconcile at once.

The kubernetes client's LeaderElection does the Lease protocol (client-go's rules: a holder renews every
retry period; a candidate takes over once the record has not changed for a whole lease duration). Around it:

* errors of any kind (connection refused, a timeout, 5xx) count as a failed attempt instead of killing the
  thread;
* every Lease request has a timeout, at most half the renew deadline (a renewal stuck on one dead connection
  still has time for another attempt) and never past the deadline of the renewal it belongs to, with no urllib3
  retries: a hung API server cannot hold the leader past its renew deadline;
* the leader gives up by exiting the process when it cannot renew within the renew deadline, which is shorter
  than the lease duration: it has stopped before a standby may start (client-go does the same), and it does not
  wait for its reconciles — they end with the process;
* a clean shutdown stops taking work, lets the reconciles in flight end (at most settings.drain_seconds, while
  the Lease is still renewed), then releases the Lease, so a rolling update hands over at once instead of after
  the lease duration, and never while the old leader still writes.

Why not Kopf peering: a paused Kopf operator still runs our own background loops, and peering freezes both
replicas when their priorities tie; a Lease is what every Kubernetes controller uses and operators know.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from . import metrics
from .health import Health
from .kube import REQUEST_TIMEOUT, one_attempt
from .settings import OperatorSettings

log = logging.getLogger(__name__)
logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every retry of a standby at INFO

LOOP = "leader-election"


class _LeaseApi(client.CoordinationV1Api):
    """The three Lease calls LeaseLock makes, each with a timeout: at most `timeout`, and never past `deadline`
    (time.monotonic(); the renew loop sets it) unless the caller passes its own."""

    def __init__(self, api_client: client.ApiClient, timeout: float) -> None:
        super().__init__(api_client)
        self.timeout = timeout
        self.deadline = math.inf

    def _bounded(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if "_request_timeout" not in kwargs:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the renew deadline has passed")
            kwargs["_request_timeout"] = min(self.timeout, left)
        return kwargs

    # The overrides forward every argument (the client's keyword arguments through **kwargs) and only bound the
    # request's time, which their narrower signatures do not tell the type checker.
    def read_namespaced_lease(self, name: str, namespace: str, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().read_namespaced_lease(name, namespace, **self._bounded(kwargs))

    def create_namespaced_lease(self, namespace: str, body: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return super().create_namespaced_lease(namespace, body, **self._bounded(kwargs))

    def replace_namespaced_lease(  # type: ignore[override]
        self, name: str, namespace: str, body: Any, **kwargs: Any
    ) -> Any:
        return super().replace_namespaced_lease(name, namespace, body, **self._bounded(kwargs))


class _Election(leaderelection.LeaderElection):
    """The library's election with every error counted as a failed attempt, and a renew deadline that holds."""

    def __init__(self, config: electionconfig.Config, health: Health, api: _LeaseApi) -> None:
        super().__init__(config)
        self.health, self.api = health, api
        self.released = threading.Event()

    def try_acquire_or_renew(self) -> bool:
        self.health.beat(LOOP)
        if self.released.is_set():
            return False
        try:
            return super().try_acquire_or_renew()
        except Exception as exc:  # e.g. a timeout, or connection refused while the API server is unreachable
            log.warning("lease %s: %s", self.election_config.lock.name, exc)
            return False

    def renew_loop(self, leading_failed: threading.Event | None = None) -> None:
        """Renew every retry period; return when no attempt succeeded within the renew deadline, counting the
        time a hung request takes (the library's loop only checks its deadline between attempts), or once
        released. (`leading_failed`, which the library's run() passes, is not used: LeaderElector drives this.)"""
        config = self.election_config
        try:
            while not self.released.is_set():
                self.api.deadline = time.monotonic() + config.renew_deadline
                while not self.try_acquire_or_renew():
                    if self.released.is_set() or time.monotonic() + config.retry_period >= self.api.deadline:
                        return
                    time.sleep(config.retry_period)
                time.sleep(config.retry_period)
        finally:
            self.api.deadline = math.inf


class LeaderElector:
    """Blocks in acquire() until this replica leads, then renews in a thread; losing the Lease ends the process.

    `stop_work(timeout)` stops taking work and waits up to `timeout` seconds for the work in flight; True when it
    ended. release() calls it before handing the Lease over."""

    def __init__(
        self,
        settings: OperatorSettings,
        health: Health,
        api_client: client.ApiClient | None = None,
        stop_work: Callable[[float], bool] = lambda timeout: True,
    ) -> None:
        self.settings, self.health, self.stop_work = settings, health, stop_work
        configuration = api_client.configuration if api_client else client.Configuration.get_default_copy()
        self.api = _LeaseApi(
            client.ApiClient(one_attempt(configuration)), min(REQUEST_TIMEOUT[1], settings.renew_deadline / 2)
        )
        self.lock = LeaseLock(settings.lease_name, settings.lease_namespace, settings.identity)
        self.lock.api_instance = self.api
        config = electionconfig.Config(
            self.lock,
            lease_duration=settings.lease_duration,
            renew_deadline=settings.renew_deadline,
            retry_period=settings.retry_period,
            onstarted_leading=lambda: None,
            onstopped_leading=None,
        )
        self.election = _Election(config, health, self.api)

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
        """On a clean shutdown: stop taking work and let the reconciles in flight end (bounded), still renewing;
        then hand the Lease over at once (an empty holder may be taken without waiting)."""
        if not self.stop_work(self.settings.drain_seconds):
            log.warning("reconciles still running after %.0fs; releasing the lease anyway", self.settings.drain_seconds)
        self.election.released.set()
        metrics.LEADER.set(0)
        timeout = self.api.timeout  # not the renew loop's deadline, which ends with it
        try:
            lease = self.api.read_namespaced_lease(self.lock.name, self.lock.namespace, _request_timeout=timeout)
            if lease.spec.holder_identity == self.settings.identity:
                lease.spec.holder_identity = None
                self.api.replace_namespaced_lease(self.lock.name, self.lock.namespace, lease, _request_timeout=timeout)
                log.info("released lease %s/%s", *self._where())
        except Exception as exc:  # an ApiException, a timeout, no connection: the Lease expires by itself
            log.warning("could not release lease %s/%s (it expires by itself): %s", *self._where(), exc)

    def _where(self) -> tuple[str, str]:
        return self.lock.namespace, self.lock.name
