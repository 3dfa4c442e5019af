"""What the operator knows of the cluster: every DPOJob, and its trainer Jobs and pods, as Kopf's watches
delivered them. The reconciler reads here instead of asking the API server (one GET and two LISTs per wake-up
before), so a reconcile costs API requests only for what it writes.

Fed by Kopf index functions (main.py), which Kopf calls for every watch event before any handler runs, and
it holds every handler back until the initial listing of all three resources is in: no reconcile ever sees a
half-filled cache. The reconciler also writes through what the API server returns from its own writes, so
the next reconcile does not act on the state before them. A watch event older than what is held (by
resourceVersion, an etcd revision on every supported server) never replaces it.

Objects are stored as compact copies of the API server's JSON (interned keys, see slim), less
`metadata.managedFields`, kubectl's last-applied annotation, a pod's spec and a Job's pod template (together
most of an object) and a few fields nothing reads (_UNREAD): the operator reads a pod's metadata and status only,
and of a Job's spec only `suspend` and `parallelism` (whether a Job is ours, its metadata says: ownership.py).
Objects are returned as copies: callers may not share them across threads.
"""

from __future__ import annotations

import copy
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .manifests import LABEL_DPOJOB, LABEL_RUN

Key = tuple[str, str]
"""(namespace, name) of a DPOJob."""
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


_UNREAD = {
    "metadata": {"managedFields", "generateName", "selfLink"},
    "Pod.status": {"hostIP", "hostIPs", "podIP", "podIPs", "qosClass"},
    "containerStatuses": {"image", "imageID", "containerID"},
}
"""Fields of a held object that nothing in the operator reads (beside a pod's spec and a Job's template)."""


_SHARED_MAX = 24
"""Strings up to this length are interned as values too: phases, reasons, condition types, kinds, label values,
timestamps repeat across objects; names, uids and messages are longer or unique."""


def _compact(value: Any, drop: frozenset[str] | set[str] = frozenset()) -> Any:
    """A copy of JSON data whose dict keys and short strings are interned: every held object would otherwise
    carry its own copy of each key ("metadata", "creationTimestamp", …), about half of what a small object
    takes."""
    if isinstance(value, dict):
        return {sys.intern(k): _compact(v) for k, v in value.items() if k not in drop}
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, str) and len(value) <= _SHARED_MAX:
        return sys.intern(value)
    return value


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A compact copy of the object without what the operator never reads."""
    kind = body.get("kind")
    result = {}
    for key, value in body.items():
        if key == "spec" and kind in ("Pod", "Job"):
            continue
        if key == "metadata":
            meta = _compact(value, _UNREAD["metadata"])
            if _LAST_APPLIED in (meta.get("annotations") or {}):
                meta["annotations"] = {k: v for k, v in meta["annotations"].items() if k != _LAST_APPLIED}
            result[key] = meta
        elif key == "status" and kind == "Pod" and isinstance(value, dict):
            status = _compact(value, _UNREAD["Pod.status"])
            for field in ("containerStatuses", "initContainerStatuses"):
                if field in status:
                    status[field] = [_compact(c, _UNREAD["containerStatuses"]) for c in status[field]]
            result[key] = status
        else:
            result[sys.intern(key)] = _compact(value)
    if kind == "Job" and "spec" in body:
        result["spec"] = {"suspend": body["spec"].get("suspend"), "parallelism": body["spec"].get("parallelism")}
    return result


def _revision(obj: Mapping[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _newer_or_same(candidate: Mapping[str, Any], held: Mapping[str, Any] | None) -> bool:
    if held is None:
        return True
    new, old = _revision(candidate), _revision(held)
    return new is None or old is None or new >= old


class ObjectCache:
    """DPOJobs by (namespace, name); Jobs and pods by (namespace, their dpo-operator.io/dpojob label).

    One lock guards all three maps; every method holds it only for dict operations (copies are made outside
    it where possible)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dpojobs: dict[Key, dict[str, Any]] = {}
        self._children: dict[str, dict[Key, dict[str, dict[str, Any]]]] = {"Job": {}, "Pod": {}}

    # --- writes: watch events (main.py, handlers.py) and write-through (reconciler) -----------------------
    def put(self, body: Mapping[str, Any]) -> None:
        """Hold an object (a DPOJob, or a Job or pod carrying our label) unless a newer one is held."""
        obj = slim(body)
        with self._lock:
            self._store(obj)

    def remove(self, kind: str, namespace: str, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Forget a deleted object (a child needs its labels to be found)."""
        with self._lock:
            self._drop(kind, namespace, name, (labels or {}).get(LABEL_DPOJOB, ""))

    def replace_all(self, kind: str, items: Iterable[Mapping[str, Any]], revision: str | None) -> list[Key]:
        """Reconcile the cache with a full LIST of `kind` (for the watched namespaces): hold what it returned,
        and drop what it lacks unless that was written after the list was taken. A watch that missed a
        DELETED event (a reconnect after a compaction) would otherwise keep a ghost forever. Returns the
        (namespace, name) of each ghost dropped."""
        listed = [slim({**item, "kind": kind}) for item in items]
        cutoff = int(revision) if revision and revision.isdigit() else None
        with self._lock:
            present = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in listed}
            dropped: list[Key] = []
            for obj in list(self._objects(kind)):
                meta = obj["metadata"]
                revision_held = _revision(obj)
                stale = cutoff is None or revision_held is None or revision_held <= cutoff
                if (meta["namespace"], meta["name"]) not in present and stale:
                    dropped.append((meta["namespace"], meta["name"]))
                    self._drop(kind, meta["namespace"], meta["name"], self._group(meta)[1])
            for obj in listed:
                self._store(obj)
        return dropped

    # --- reads (reconciler, resync) -------------------------------------------------------------------------
    def dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            held = self._dpojobs.get((namespace, name))
        return copy.deepcopy(held) if held is not None else None

    def dpojob_keys(self) -> list[Key]:
        with self._lock:
            return list(self._dpojobs)

    def jobs(self, namespace: str, label: str) -> list[dict[str, Any]]:
        """Jobs labelled dpo-operator.io/dpojob=<label> (manifests.label_value of the DPOJob's name)."""
        return self._children_of("Job", namespace, label)

    def pods(self, namespace: str, label: str, run: int | None = None) -> list[dict[str, Any]]:
        """Pods of one run of a DPOJob, or of all its runs (any pod carrying the labels: ownership is checked by
        the caller)."""
        return [
            pod
            for pod in self._children_of("Pod", namespace, label)
            if run is None or (pod["metadata"].get("labels") or {}).get(LABEL_RUN) == str(run)
        ]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "DPOJob": len(self._dpojobs),
                **{kind: sum(len(g) for g in groups.values()) for kind, groups in self._children.items()},
            }

    # --- internals (lock held) --------------------------------------------------------------------------------
    @staticmethod
    def _group(meta: Mapping[str, Any]) -> Key:
        return meta["namespace"], (meta.get("labels") or {}).get(LABEL_DPOJOB, "")

    def _children_of(self, kind: str, namespace: str, label: str) -> list[dict[str, Any]]:
        with self._lock:
            held = list(self._children[kind].get((namespace, label), {}).values())
        return copy.deepcopy(held)

    def _objects(self, kind: str) -> Iterable[dict[str, Any]]:
        if kind in self._children:
            return [obj for group in self._children[kind].values() for obj in group.values()]
        return list(self._dpojobs.values())

    def _store(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if obj.get("kind") in self._children:
            group = self._children[obj["kind"]].setdefault(self._group(meta), {})
            if _newer_or_same(obj, group.get(meta["name"])):
                group[meta["name"]] = obj
        else:
            key = (meta["namespace"], meta["name"])
            if _newer_or_same(obj, self._dpojobs.get(key)):
                self._dpojobs[key] = obj

    def _drop(self, kind: str, namespace: str, name: str, label: str) -> None:
        if kind in self._children:
            group = self._children[kind].get((namespace, label), {})
            group.pop(name, None)
            if not group:
                self._children[kind].pop((namespace, label), None)
        else:
            self._dpojobs.pop((namespace, name), None)
