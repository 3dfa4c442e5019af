"""Thin wrappers over the Kubernetes API that the reconciler needs: idempotent create, status patch, events."""

from __future__ import annotations

import copy
import json
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dpojob_api.spec import API_GROUP, API_VERSION, KIND, PLURAL

from .logs import about
from .manifests import MANAGED_BY, ServerFeatures

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (10.0, 60.0)
"""(connect, read) seconds of every API request: without it a request to an API server that accepted the
connection but never answers blocks its thread for good (a worker, the resync, the Event poster). The read
timeout is a silence, not a total: a long LIST that keeps streaming is not cut; the API server ends its own
requests after 60 s (its --request-timeout), so nothing comes later."""

LIST_PAGE = 500
"""Objects per page of a relist (list_all)."""


def one_attempt(configuration: client.Configuration) -> client.Configuration:
    """A copy of `configuration` whose requests make one attempt each. urllib3 would retry a GET or PUT that
    timed out three more times, each with a fresh timeout, so a hung API server would hold the caller four
    timeouts long; the callers retry by themselves (the next reconcile or resync, the next Lease renewal)."""
    bounded = copy.deepcopy(configuration)
    bounded.retries = False
    return bounded


class ChildRejectedError(RuntimeError):
    """The API server refused to create a child (a 4xx other than conflict or throttling): the same request
    would be refused again, so it becomes a status reason instead of a retry."""

    def __init__(self, kind: str, name: str, code: int, message: str) -> None:
        super().__init__(f"the API server refused the trainer {kind} {name} ({code}): {message}")
        self.code = code


def server_message(exc: ApiException) -> str:
    """The Status message of an API error (it names the offending field), on one line."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return " ".join(str(message or exc.reason or exc.status).split())[:900]


class NotOwnedError(RuntimeError):
    """An object with the name we need exists but belongs to something else (e.g. a deleted DPOJob)."""


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """obj has a controller ownerReference to uid (a same-named object of a deleted owner does not count)."""
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or [])


def merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge patch turning old into new (removed keys become null); {} when equal."""
    patch: dict[str, Any] = {key: None for key in old.keys() - new.keys()}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, dict) and isinstance(before, dict):
            if sub := merge_patch(before, value):
                patch[key] = sub
        elif key not in old or before != value:
            patch[key] = value
    return patch


def prune_none(value: Any) -> Any:
    """Drop None and "" values recursively: absent means empty, and comparing with what the server returns
    needs one spelling (the Kubernetes 1.20 apiserver built here even reads "" in a CR status back as null)."""
    if isinstance(value, dict):
        return {k: prune_none(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [prune_none(v) for v in value]
    return value


_PATHS = {
    "DPOJob": f"/apis/{API_GROUP}/{API_VERSION}",
    "Job": "/apis/batch/v1",
    "Pod": "/api/v1",
    "ConfigMap": "/api/v1",
    "Secret": "/api/v1",
    "Event": "/api/v1",
}
_PLURALS = {
    "DPOJob": PLURAL,
    "Job": "jobs",
    "Pod": "pods",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Event": "events",
}


def resource_path(kind: str, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
    """The REST path of a kind's collection or object (all namespaces when namespace is None)."""
    parts = [_PATHS[kind], *(["namespaces", namespace] if namespace else []), _PLURALS[kind]]
    parts += [name] if name else []
    parts += [subresource] if subresource else []
    return "/".join(parts)


@dataclass
class Kube:
    """The API requests the operator makes, as JSON in and out, over the kubernetes client's ApiClient (its
    credentials, TLS, token refresh and connection pool). Not through its typed API classes: importing those
    and their models for batch/v1 and core/v1 costs a good share of the operator's memory (docs/benchmarks.md),
    and the operator reads the API server's JSON anyway."""

    api_client: client.ApiClient
    request_timeout: tuple[float, float] = REQUEST_TIMEOUT

    def __post_init__(self) -> None:
        self.instance = socket.gethostname()

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One API request, within request_timeout; the answer's JSON. A non-2xx answer raises ApiException, as the
        typed API does."""
        params = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json", **({"Content-Type": content_type} if body else {})},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*params, _request_timeout=self.request_timeout)
        data = response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return json.loads(data) if data else {}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when there is none."""
        try:
            return self.request("GET", resource_path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get("DPOJob", namespace, name)

    def patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the object as it is now (conditional on its UID: not one re-created under its name); the
        object as patched."""
        meta = obj["metadata"]
        body = {**patch, "metadata": {**patch.get("metadata", {}), "uid": meta["uid"]}}
        path = resource_path(obj["kind"], meta["namespace"], meta["name"])
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def server_features(self) -> ServerFeatures:
        """The Job features of this API server's version."""
        version = self.request("GET", "/version")
        release = (int(version["major"]), int("".join(ch for ch in version["minor"] if ch.isdigit()) or 0))
        return ServerFeatures(pod_failure_policy=release >= (1, 26), job_suspend=release >= (1, 21))

    def patch_status(self, dpojob: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource, conditional on the resourceVersion we computed from (409 if stale)."""
        meta = dpojob["metadata"]
        body = {"metadata": {"resourceVersion": meta["resourceVersion"]}, "status": patch}
        path = resource_path("DPOJob", meta["namespace"], meta["name"], "status")
        return self.request("PATCH", path, body=body, content_type="application/merge-patch+json")

    def list_all(
        self,
        kind: str,
        namespaces: list[str],
        keep: Callable[[dict[str, Any]], Any] = lambda item: item,
        page: int = LIST_PAGE,
    ) -> tuple[list[Any], str | None]:
        """Every DPOJob, or every Job or pod managed by the operator, in the given namespaces (all when empty:
        a namespaced operator may not list cluster-wide), each as `keep` makes it of the object (with its
        kind), and the oldest resourceVersion of the lists. Read `page` objects at a time, each page passed
        through `keep` before the next is asked for: a whole listing of thousands of pods and Jobs, as the API
        server sends it, is many times what the operator keeps of it (ObjectCache.listed), and the heap it
        took would stay with the process."""
        query = {} if kind == "DPOJob" else {"labelSelector": f"app.kubernetes.io/managed-by={MANAGED_BY}"}
        items: list[Any] = []
        revisions: list[str] = []
        targets: list[str | None] = [*namespaces] if namespaces else [None]
        for namespace in targets:
            token = None
            while True:
                listing = self.request(
                    "GET",
                    resource_path(kind, namespace),
                    {**query, "limit": str(page), **({"continue": token} if token else {})},
                )
                items += [keep({**item, "kind": kind}) for item in listing.pop("items")]
                token = listing["metadata"].get("continue")
                if not token:
                    break
            # every page of a listing is read at its first page's resourceVersion
            revisions.append(listing["metadata"].get("resourceVersion") or "")
        numeric = [int(r) for r in revisions if r.isdigit()]
        return items, str(min(numeric)) if len(numeric) == len(revisions) else None

    def failed_creates(self, namespace: str) -> dict[str, str]:
        """Why the Job controller cannot create pods in the namespace: the newest FailedCreate Event message of
        each object that has one (a quota, a missing PriorityClass or ServiceAccount, an admission policy), by
        the object's uid. One LIST serves every Job of the namespace, from the API server's watch cache
        (resourceVersion 0): a field selector is a filter over every Event of the namespace, a scan of etcd
        per request without it."""
        query = {"fieldSelector": "reason=FailedCreate", "resourceVersion": "0"}
        newest: dict[str, tuple[str, str]] = {}
        for event in self.request("GET", resource_path("Event", namespace), query)["items"]:
            uid = (event.get("involvedObject") or {}).get("uid")
            when = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp")
            if uid and (uid not in newest or (when or "") > newest[uid][0]):
                newest[uid] = (when or "", " ".join((event.get("message") or "").split())[:900])
        return {uid: message for uid, (_, message) in newest.items()}

    def create_or_adopt(self, body: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
        """Create a Job or ConfigMap; on 409 return the existing one if it names `owner_uid` as controller (whether
        a Job is really the run's, its UID says: Reconciler.trusted). True when created."""
        namespace, name, kind = body["metadata"]["namespace"], body["metadata"]["name"], body["kind"]
        collection = resource_path(kind, namespace)
        try:
            return self.request("POST", collection, body=body), True
        except ApiException as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
                raise ChildRejectedError(kind, name, exc.status, server_message(exc)) from None
            if exc.status != 409:
                raise
        existing = self.request("GET", resource_path(kind, namespace, name))
        if not owned_by(existing, owner_uid):
            raise NotOwnedError(
                f"{kind} {name} exists but is not controlled by this DPOJob (left by a deleted DPOJob of the same "
                "name, or created by someone else); waiting until it is gone"
            )
        if kind == "ConfigMap" and existing.get("data") != body.get("data"):
            # Ours, written before a runtime edit (e.g. during a suspend): the trainer must read the current spec.
            self.delete("ConfigMap", namespace, name)
            return self.request("POST", collection, body=body), True
        return existing, False

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Delete a Job (with its pods, in the background) or ConfigMap, only the object with this uid if one is
        given (not one created meanwhile under the same name); False when already gone."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", resource_path(kind, namespace, name), body=body)
        except ApiException as exc:
            if exc.status == 404 or (uid is not None and exc.status == 409):
                return False
            raise
        return True

    def post_event(self, dpojob: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the DPOJob (kubectl describe shows it). Failures are logged, not raised."""
        meta = dpojob["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "dpo-operator"},
            "reportingComponent": "dpo-operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", resource_path("Event", meta["namespace"]), body=body)
        except ApiException as exc:
            log.warning(
                "could not post event %s on %s/%s: %s",
                reason,
                meta["namespace"],
                meta["name"],
                exc.reason,
                extra=about(meta["namespace"], meta["name"]),
            )
