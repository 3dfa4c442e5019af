"""How Kopf is set up for this operator: on.event handlers and index functions only, so Kopf keeps no per-object
state, writes nothing to the objects, and lists and watches only what the operator reconciles."""

from __future__ import annotations

from typing import Any

import kopf
from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory  # kopf is pinned to 1.45

from .kube import LIST_PAGE
from .manifests import MANAGED_BY

# Kopf's default retries a failing API request for about a minute, then lets the error escalate; for its
# resource observer that ends the whole operator. Ride out an API outage of about eight minutes instead (the
# kubelet restarts the pod after that, visibly, as CrashLoopBackOff).
API_ERROR_BACKOFFS = (1.0, 2.0, 4.0, 8.0, 15.0) + (30.0,) * 15


class NoDiffBase(kopf.DiffBaseStorage):
    """The operator has no on.create/update handlers, so Kopf needs no "last handled" essence of an object;
    its default builds one (a deep copy of the whole object) on every watch event (its CPU: docs/benchmarks.md)."""

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


def configure(settings: kopf.OperatorSettings) -> None:
    """Only our own Events; watch only our children server-side; no per-object state."""
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
