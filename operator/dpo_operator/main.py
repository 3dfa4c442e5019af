"""Entry module: registers the Kopf handlers, and the `dpo-operator` console script.

Run with `dpo-operator` (settings from DPO_OPERATOR_* env, see settings.py; the Helm chart sets them).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from dpojob_api.spec import API_GROUP, API_VERSION, PLURAL

from . import handlers, health, metrics
from .kube import one_attempt
from .leader import LeaderElector
from .manifests import LABEL_DPOJOB, MANAGED_BY
from .settings import OperatorSettings, SettingsError

CHILDREN: dict[str, Any] = {  # a label value, or kopf.PRESENT
    LABEL_DPOJOB: kopf.PRESENT,
    "app.kubernetes.io/managed-by": MANAGED_BY,
}
log = logging.getLogger("dpo_operator")


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: object) -> None:
    handlers.startup(settings, memo)


@kopf.on.startup()
async def beat_event_loop(memo: kopf.Memo, **_: object) -> None:
    await handlers.beat_event_loop(memo)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: object) -> None:
    handlers.cleanup(memo)


@kopf.index(API_GROUP, API_VERSION, PLURAL)
async def dpojob_cache(body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    handlers.hold(body, memo)


@kopf.index("batch", "v1", "jobs", labels=CHILDREN)
async def job_cache(body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    handlers.hold(body, memo)


@kopf.index("", "v1", "pods", labels=CHILDREN)
async def pod_cache(body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    handlers.hold(body, memo)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def dpojob_event(event: kopf.RawEvent, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    handlers.on_dpojob(dict(event), namespace or "", name, memo)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
@kopf.on.event("", "v1", "pods", labels=CHILDREN)
async def child_event(
    event: kopf.RawEvent,
    namespace: str | None,
    name: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    memo: kopf.Memo,
    **_: Any,
) -> None:
    handlers.on_child(dict(event), namespace or "", name, labels, annotations, memo)


def load_cluster_credentials() -> str:
    """In a pod: its ServiceAccount (in-cluster config); elsewhere: the kubeconfig. Returns which one. The
    client's default Configuration, which every ApiClient copies, then makes one attempt per request."""
    try:
        config.load_incluster_config()
        source = "in-cluster service account"
    except config.ConfigException:
        config.load_kube_config()
        source = "kubeconfig"
    client.Configuration.set_default(one_attempt(client.Configuration.get_default_copy()))
    return source


def stop_reconciling(memo: kopf.Memo, timeout: float) -> bool:
    """Take no more work and wait up to `timeout` seconds for the reconciles in flight; True when they ended."""
    queue = memo.get("queue")  # handlers.startup made it, if Kopf got that far
    if queue is None:
        return True
    queue.shut_down()
    return queue.wait_idle(timeout)


def cli() -> None:
    """Serve health and metrics, wait for the leader Lease (when enabled), then run Kopf until stopped."""
    parser = argparse.ArgumentParser(prog="dpo-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only these (repeatable)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    try:
        settings = OperatorSettings.from_env()
    except SettingsError as exc:
        sys.exit(f"dpo-operator: {exc}")
    if args.namespace:
        settings.namespaces = args.namespace
    verbose = args.verbose or settings.verbose
    kopf.configure(verbose=verbose)
    if not verbose:
        # Kopf logs "Handler … succeeded" at INFO for every watch event (a sixth of its CPU at 1,000 DPOJobs);
        # its warnings and errors still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    metrics.per_dpojob_series(settings.per_dpojob_series)
    status = health.Health()
    health.serve(status, settings.listen_address, settings.port)
    log.info("credentials: %s", load_cluster_credentials())
    memo = kopf.Memo(settings=settings, health=status, elector=None)
    elector = None
    if settings.leader_election:
        elector = memo.elector = LeaderElector(settings, status, stop_work=functools.partial(stop_reconciling, memo))
        status.ready.set()  # a standby is ready: a rolling update must be able to retire the old leader
        elector.acquire()
        status.ready.clear()
    else:
        metrics.LEADER.set(1)
    try:
        kopf.run(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            memo=memo,
            memories=handlers.NoObjectMemories(),
        )
    finally:
        if elector is not None:
            elector.release()
