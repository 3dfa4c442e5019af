"""Entry module: the Kopf handlers (thin: they hand every event to the reconciler, see reconciler.py) and the
`dpo-operator` console script.

Run with `dpo-operator` (settings from DPO_OPERATOR_* env, see settings.py; the Helm chart sets them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import sys
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes import client, config

from dpojob_api.spec import API_GROUP, API_VERSION, PLURAL

from . import __version__, health, kopf_config, logs, metrics
from .cache import ObjectCache
from .kube import Kube, one_attempt
from .leader import LeaderElector
from .manifests import ANNOTATION_DPOJOB, LABEL_DPOJOB, MANAGED_BY
from .reconciler import Reconciler
from .settings import OperatorSettings, SettingsError
from .workqueue import WorkQueue

CHILDREN: dict[str, Any] = {  # a label value, or kopf.PRESENT
    LABEL_DPOJOB: kopf.PRESENT,
    "app.kubernetes.io/managed-by": MANAGED_BY,
}
log = logging.getLogger("dpo_operator")
EVENT_LOOP = "kopf-event-loop"
_BEAT_SECONDS = 5.0


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: object) -> None:
    """Set Kopf up (kopf_config) and start the reconciler, its log followers on Kopf's loop. Handlers are
    on.event only, so Kopf writes nothing to the objects: no finalizer, no annotations. cli() has loaded the
    cluster credentials and put the operator's settings and health in the memo."""
    kopf_config.configure(settings)
    kube = Kube(client.ApiClient())
    memo.cache, memo.queue = ObjectCache(), WorkQueue()
    features = await asyncio.to_thread(kube.server_features)  # a request: not on the loop
    memo.reconciler = Reconciler(kube, memo.cache, memo.queue, memo.settings, memo.health, features)
    memo.reconciler.followers.attach(asyncio.get_running_loop())
    memo.reconciler.start()
    memo.health.ready.set()


@kopf.on.startup()
async def beat_event_loop(memo: kopf.Memo, **_: object) -> None:
    """Let /healthz see Kopf's event loop: a stalled loop (every watch and handler with it) stops beating."""
    health = memo.health
    health.register(EVENT_LOOP, max_silence=60.0, thread=threading.main_thread())

    async def beat() -> None:
        while True:
            health.beat(EVENT_LOOP)
            await asyncio.sleep(_BEAT_SECONDS)

    memo.event_loop_beat = asyncio.get_running_loop().create_task(beat())


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: object) -> None:
    """On SIGTERM: stop the loops, then hand the Lease over at once (before Kopf's own shutdown finishes,
    which the kubelet may cut short with SIGKILL)."""
    memo.health.ready.clear()
    memo.reconciler.stop()
    if memo.elector is not None:
        memo.elector.release()


@kopf.index(API_GROUP, API_VERSION, PLURAL, id="dpojobs")  # one index per resource: Kopf keys indexes by id
@kopf.index("batch", "v1", "jobs", labels=CHILDREN, id="jobs")
@kopf.index("", "v1", "pods", labels=CHILDREN, id="pods")
async def hold(body: kopf.Body, memo: kopf.Memo, **_: object) -> None:
    """Index function for every watched resource: keep the object in the cache (see cache.py). Kopf holds all
    handlers back until the initial listing of every indexed resource is in, so no reconcile sees a cluster
    half-listed."""
    memo.cache.put(body)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def dpojob_event(event: kopf.RawEvent, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A DPOJob changed: reconcile it, urgently when its spec has not been acted on (see workqueue.py)."""
    namespace = namespace or ""
    if event.get("type") == "DELETED":
        memo.cache.remove("DPOJob", namespace, name)
        memo.reconciler.forget(namespace, name)
        return
    dpojob = event.get("object") or {}
    acted_on = (dpojob.get("status") or {}).get("observedGeneration") == dpojob.get("metadata", {}).get("generation")
    memo.queue.add((namespace, name), urgent=not acted_on)


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
    """A trainer Job or pod changed: reconcile the DPOJob it belongs to (its full name is an annotation; the
    label may be shortened)."""
    if event.get("type") == "DELETED":
        memo.cache.remove(event["object"]["kind"], namespace or "", name, labels)
    memo.queue.add((namespace or "", annotations.get(ANNOTATION_DPOJOB) or labels[LABEL_DPOJOB]))


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
    queue = memo.get("queue")  # startup() made it, if Kopf got that far
    if queue is None:
        return True
    queue.shut_down()
    return queue.wait_idle(timeout)


def cli() -> None:
    """Parse the command line and settings, then run the operator (run) on one event loop until stopped."""
    parser = argparse.ArgumentParser(prog="dpo-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only these (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="debug logging (as DPO_OPERATOR_LOG_LEVEL=DEBUG)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args()
    try:
        settings = OperatorSettings.from_env()
    except SettingsError as exc:
        sys.exit(f"dpo-operator: {exc}")
    if args.namespace:
        settings.namespaces = args.namespace
    settings.verbose = args.verbose or settings.verbose
    logs.configure(settings.log_format, settings.effective_log_level)
    log.info("dpo-operator %s starting with settings %s", __version__, json.dumps(settings.loggable()))
    metrics.per_dpojob_series(settings.per_dpojob_series)
    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(run(settings))


async def run(settings: OperatorSettings) -> None:
    """Serve health and metrics, wait for the leader Lease (when enabled), then run Kopf, all on this loop."""
    status = health.Health()
    await health.serve(status, settings.listen_address, settings.port)
    log.info("credentials: %s", load_cluster_credentials())
    memo = kopf.Memo(settings=settings, health=status, elector=None)
    elector = None
    if settings.leader_election:
        elector = memo.elector = LeaderElector(settings, status, stop_work=functools.partial(stop_reconciling, memo))
        status.ready.set()  # a standby is ready: a rolling update must be able to retire the old leader
        await asyncio.to_thread(elector.acquire)  # blocking; the loop goes on answering probes
        status.ready.clear()
    else:
        metrics.LEADER.set(1)
    try:
        await kopf.operator(
            standalone=True,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            memo=memo,
            memories=kopf_config.NoObjectMemories(),
        )
    finally:
        if elector is not None:
            elector.release()
