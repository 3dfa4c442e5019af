"""Kopf handler bodies: wire the operator's settings and hand every event to the reconciler."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Mapping
from typing import Any

import kopf
from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory  # kopf is pinned to 1.45
from kubernetes import client

from .cache import ObjectCache
from .kube import LIST_PAGE, Kube
from .manifests import ANNOTATION_DPOJOB, LABEL_DPOJOB, MANAGED_BY
from .reconciler import Reconciler
from .workqueue import WorkQueue

log = logging.getLogger(__name__)
EVENT_LOOP = "kopf-event-loop"
_BEAT_SECONDS = 5.0
# Kopf's default retries a failing API request for about a minute, then lets the error escalate; for its
# resource observer that ends the whole operator. Ride out an API outage of about eight minutes instead (the
# kubelet restarts the pod after that, visibly, as CrashLoopBackOff).
API_ERROR_BACKOFFS = (1.0, 2.0, 4.0, 8.0, 15.0) + (30.0,) * 15


class NoDiffBase(kopf.DiffBaseStorage):
    """The operator has no on.create/update handlers, so Kopf needs no "last handled" essence of an object;
    its default builds one (a deep copy of the whole object) on every watch event, a third of its CPU here."""

    def build(self, *, body: kopf.Body, extra_fields: object = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        pass


class NoObjectMemories(ResourceMemories):
    """Kopf keeps a record per watched object for as long as it exists (a copy of the memo, an error throttler,
    indexing and daemon state, handler progress): state for daemons, timers and change handlers, none of which
    this operator has (on.event handlers and index functions only, see NoDiffBase), at the cost of a few KB for
    every DPOJob, Job and pod watched. Each event gets a fresh record instead, so an object costs Kopf nothing
    between its events (an error inside Kopf's own processing of an event is then throttled per event)."""

    async def recall(
        self,
        raw_body: kopf.RawBody,
        *,
        memobase: Any = None,
        noticed_by_listing: bool = False,
        ephemeral: bool = False,
    ) -> ResourceMemory:
        return await super().recall(raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing, ephemeral=True)


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Only our own Events; watch only our children server-side; start the reconciler.

    Handlers are on.event only, so Kopf writes nothing to the objects: no finalizer, no annotations.
    main.cli has loaded the cluster credentials and put the operator's settings and health in the memo.
    """
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = NoDiffBase()
    # Kopf keeps a worker task per object until it has been idle this long (5 s by default): at 1,000 new
    # DPOJobs that is 3,000 live tasks, whose memory stays fragmented after they end. Events here are handled
    # at once and need no batching, so let workers end soon.
    settings.queueing.idle_timeout = 0.5
    # Kopf lists each resource before watching it, unpaginated by default: a restart among 10,000 DPOJobs (their
    # Jobs and pending pods) parsed three lists of 10,000 objects at once, several times the operator's settled
    # memory (measured in docs/benchmarks.md). Page by page it holds one page of each.
    settings.watching.chunk_size = LIST_PAGE
    settings.networking.error_backoffs = API_ERROR_BACKOFFS
    # The watched resources are fixed (DPOJobs, Jobs, pods): discover them once at startup. Scanning would also
    # watch every CRD and namespace and re-read API discovery on each change, where Kopf 1.45 does not retry a
    # truncated response body: one dropped connection there ended the operator. Namespaced mode also must not
    # list namespaces (that needs cluster rights).
    settings.scanning.disabled = True
    for resource in ("jobs", "pods"):
        settings.watching.label_selectors[resource] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    kube = Kube(client.ApiClient())
    memo.cache, memo.queue = ObjectCache(), WorkQueue()
    memo.reconciler = Reconciler(kube, memo.cache, memo.queue, memo.settings, memo.health, kube.server_features())
    memo.reconciler.start()
    memo.health.ready.set()


async def beat_event_loop(memo: kopf.Memo) -> None:
    """Let /healthz see Kopf's event loop: a stalled loop (every watch and handler with it) stops beating."""
    health = memo.health
    health.register(EVENT_LOOP, max_silence=60.0, thread=threading.main_thread())

    async def beat() -> None:
        while True:
            health.beat(EVENT_LOOP)
            await asyncio.sleep(_BEAT_SECONDS)

    memo.event_loop_beat = asyncio.get_running_loop().create_task(beat())


def cleanup(memo: kopf.Memo) -> None:
    """On SIGTERM: stop the loops, then hand the Lease over at once (before Kopf's own shutdown finishes,
    which the kubelet may cut short with SIGKILL)."""
    memo.health.ready.clear()
    memo.reconciler.stop()
    if memo.elector is not None:
        memo.elector.release()


def hold(body: kopf.Body, memo: kopf.Memo) -> None:
    """Index function for every watched resource: keep the object in the cache (see cache.py). Kopf holds all
    handlers back until the initial listing of every indexed resource is in, so no reconcile sees a cluster
    half-listed."""
    memo.cache.put(body)


def on_dpojob(event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo) -> None:
    if event.get("type") == "DELETED":
        memo.cache.remove("DPOJob", namespace, name)
        memo.reconciler.forget(namespace, name)
        return
    dpojob = event.get("object") or {}
    acted_on = (dpojob.get("status") or {}).get("observedGeneration") == dpojob.get("metadata", {}).get("generation")
    memo.queue.add((namespace, name), urgent=not acted_on)


def on_child(
    event: dict[str, Any],
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    memo: kopf.Memo,
) -> None:
    """A trainer Job or pod changed: reconcile the DPOJob it belongs to (its full name is an annotation; the
    label may be shortened)."""
    if event.get("type") == "DELETED":
        memo.cache.remove(event["object"]["kind"], namespace, name, labels)
    memo.queue.add((namespace, annotations.get(ANNOTATION_DPOJOB) or labels[LABEL_DPOJOB]))
