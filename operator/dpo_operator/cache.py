"""What the operator knows of the cluster: every DPOJob, and its trainer Jobs and pods, as Kopf's watches
delivered them. The reconciler reads here instead of asking the API server (one GET and two LISTs per wake-up
before), so a reconcile costs API requests only for what it writes.

Fed by Kopf index functions (main.py), which Kopf calls for every watch event before any handler runs, and
it holds every handler back until the initial listing of all three resources is in: no reconcile ever sees a
half-filled cache. The reconciler also writes through what the API server returns from its own writes, so
the next reconcile does not act on the state before them. A watch event older than what is held (by
resourceVersion, an etcd revision on every supported server) never replaces it.

Objects are held as compact copies of the API server's JSON (see slim), less `metadata.managedFields`,
kubectl's last-applied annotation, a pod's spec and a Job's pod template (together most of an object) and a few
fields nothing reads (_UNREAD): the operator reads a pod's metadata and status only, and of a Job's spec only
`suspend` and `parallelism` (whether a Job is ours, its metadata says: ownership.py). Each is held serialized and
compressed (_pack: a few times smaller than the same object as Python dicts, and no heap of small objects per
held object), and every read decodes a private copy, cheaper than the deep copy that callers, which may not
share objects across threads, would need anyway.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

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


def _compact(value: Any, drop: frozenset[str] | set[str] = frozenset()) -> Any:
    """A copy of a JSON document's top level without the `drop` keys."""
    return {k: v for k, v in value.items() if k not in drop} if isinstance(value, dict) else value


def _pack(obj: Mapping[str, Any]) -> bytes:
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1)


def _unpack(blob: bytes) -> dict[str, Any]:
    return json.loads(zlib.decompress(blob))


_Held = tuple[int | None, bytes]
"""A held object: its resourceVersion (newer wins) and its packed JSON."""


class Listed(NamedTuple):
    """A listed object as the cache will hold it, and where (ObjectCache.listed)."""

    namespace: str
    name: str
    label: str
    """Its dpo-operator.io/dpojob label (children only)."""
    held: _Held | None
    """None: held already at the same resourceVersion (nothing to replace)."""


def slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the object without what the operator never reads (what it keeps is shared with `body`)."""
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
            result[key] = value
    if kind == "Job" and "spec" in body:
        result["spec"] = {"suspend": body["spec"].get("suspend"), "parallelism": body["spec"].get("parallelism")}
    return result


def _revision(obj: Mapping[str, Any]) -> int | None:
    try:
        return int(obj["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def _newer_or_same(candidate: int | None, held: _Held | None) -> bool:
    return held is None or candidate is None or held[0] is None or candidate >= held[0]


class ObjectCache:
    """DPOJobs by (namespace, name); Jobs and pods by (namespace, their dpo-operator.io/dpojob label).

    One lock guards all three maps; every method holds it only for dict operations (objects are packed and
    unpacked outside it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dpojobs: dict[Key, _Held] = {}
        self._children: dict[str, dict[Key, dict[str, _Held]]] = {"Job": {}, "Pod": {}}

    # --- writes: watch events (main.py, handlers.py) and write-through (reconciler) -----------------------
    def put(self, body: Mapping[str, Any]) -> None:
        """Hold an object (a DPOJob, or a Job or pod carrying our label) unless a newer one is held."""
        obj = slim(body)
        meta, held = obj["metadata"], (_revision(obj), _pack(obj))
        with self._lock:
            self._store(obj.get("kind"), meta["namespace"], meta["name"], self._group(meta)[1], held)

    def remove(self, kind: str, namespace: str, name: str, labels: Mapping[str, str] | None = None) -> None:
        """Forget a deleted object (a child needs its labels to be found)."""
        with self._lock:
            self._drop(kind, namespace, name, (labels or {}).get(LABEL_DPOJOB, ""))

    def replace_all(self, kind: str, items: Iterable[Mapping[str, Any] | Listed], revision: str | None) -> list[Key]:
        """Reconcile the cache with a full LIST of `kind` (for the watched namespaces): hold what it returned,
        and drop what it lacks unless that was written after the list was taken. A watch that missed a
        DELETED event (a reconnect after a compaction) would otherwise keep a ghost forever. Returns the
        (namespace, name) of each ghost dropped. `items` may come as `listed` made them, page by page while
        the LIST was read (Kube.list_all's `keep`), so that a listing of thousands never exists in full."""
        entries = [item if isinstance(item, Listed) else self.listed(kind, item) for item in items]
        cutoff = int(revision) if revision and revision.isdigit() else None
        with self._lock:
            present = {(entry.namespace, entry.name) for entry in entries}
            dropped: list[Key] = []
            for namespace, name, label, revision_held in list(self._held(kind)):
                stale = cutoff is None or revision_held is None or revision_held <= cutoff
                if (namespace, name) not in present and stale:
                    dropped.append((namespace, name))
                    self._drop(kind, namespace, name, label)
            for entry in entries:
                if entry.held is not None:
                    self._store(kind, entry.namespace, entry.name, entry.label, entry.held)
        return dropped

    def listed(self, kind: str, item: Mapping[str, Any]) -> Listed:
        """A listed object of `kind` as replace_all holds it. One held already at the same resourceVersion is
        not copied again: a relist of a cluster that did not change allocates next to nothing per object."""
        meta = item["metadata"]
        namespace, name, label, revision = meta["namespace"], meta["name"], self._group(meta)[1], _revision(item)
        with self._lock:
            if kind in self._children:
                current = self._children[kind].get((namespace, label), {}).get(name)
            else:
                current = self._dpojobs.get((namespace, name))
        if revision is not None and current is not None and current[0] == revision:
            return Listed(namespace, name, label, None)
        obj = slim({**item, "kind": kind})
        return Listed(namespace, name, label, (revision, _pack(obj)))

    # --- reads (reconciler, resync) -------------------------------------------------------------------------
    def dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            held = self._dpojobs.get((namespace, name))
        return _unpack(held[1]) if held is not None else None

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
        return [_unpack(blob) for _, blob in held]

    def _held(self, kind: str) -> Iterator[tuple[str, str, str, int | None]]:
        """(namespace, name, dpojob label, resourceVersion) of every held object of the kind."""
        if kind in self._children:
            for (namespace, label), group in self._children[kind].items():
                for name, (revision, _) in group.items():
                    yield namespace, name, label, revision
        else:
            for (namespace, name), (revision, _) in self._dpojobs.items():
                yield namespace, name, "", revision

    def _store(self, kind: str | None, namespace: str, name: str, label: str, held: _Held) -> None:
        if kind in self._children:
            group = self._children[kind].setdefault((namespace, label), {})
            if _newer_or_same(held[0], group.get(name)):
                group[name] = held
        elif _newer_or_same(held[0], self._dpojobs.get((namespace, name))):
            self._dpojobs[(namespace, name)] = held

    def _drop(self, kind: str, namespace: str, name: str, label: str) -> None:
        if kind in self._children:
            group = self._children[kind].get((namespace, label), {})
            group.pop(name, None)
            if not group:
                self._children[kind].pop((namespace, label), None)
        else:
            self._dpojobs.pop((namespace, name), None)
