"""Counting a client's API requests from the API server's audit log (LocalCluster(audit_users=...)), named and
counted exactly as the counting proxy (dpo_dev.api_proxy) does, but with no hop between client and server."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

AUDIT_VERBS = {"create": "POST", "update": "PUT", "patch": "PATCH"}
"""Audit verbs named by their HTTP method, as the proxy names them; the others (get, list, watch, delete,
deletecollection, and a non-resource request's method) are upper-cased."""


def audit_key(event: dict[str, Any]) -> str:
    """An audit event's request as dpo_dev.api_proxy counts it: "VERB resource[/subresource]" (no group, no
    namespace: "PATCH dpojobs/status", "WATCH jobs", "GET pods/log"), a non-resource URL by its path
    ("GET /version", "GET /apis/dpo.dev/v1")."""
    ref = event.get("objectRef") or {}
    verb = event["verb"]
    if not ref.get("resource"):
        path = urlsplit(event["requestURI"]).path
        return f"{verb.upper()} /" + "/".join(part for part in path.split("/") if part)
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return f"{AUDIT_VERBS.get(verb, verb.upper())} {resource}"


class AuditCounter:
    """Requests by "VERB resource", from the JSON lines the API server appended to its audit log since the last
    read; the interface of dpo_dev.api_proxy's counters (counts, reset).

    A long-running request logs an event when it opens (a watch its RequestReceived, a log stream its
    ResponseStarted: see LocalCluster.audit_log) and ResponseComplete when it ends: it is counted once, when it
    opens (as the proxy counts it on arrival). Any other request logs only ResponseComplete, and counts then.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self._open: set[str] = set()  # auditIDs of long-running requests counted when they opened
        self._requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _read(self) -> None:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:  # the API server creates it with its first event
            return
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            if line.strip():
                self._event(json.loads(line))

    def _event(self, event: dict[str, Any]) -> None:
        stage, audit_id = event.get("stage"), event.get("auditID", "")
        if audit_id in self._open:  # a later stage of a watch/log stream counted when it opened
            if stage in ("ResponseComplete", "Panic"):
                self._open.discard(audit_id)
            return
        if stage in ("RequestReceived", "ResponseStarted"):
            self._open.add(audit_id)
        elif stage not in ("ResponseComplete", "Panic"):
            return
        self._requests[audit_key(event)] += 1

    def counts(self) -> dict[str, int]:
        """Requests so far by "VERB resource", most frequent first."""
        with self._lock:
            self._read()
            return dict(self._requests.most_common())

    def reset(self) -> dict[str, int]:
        """The counts so far; counting starts again from zero."""
        with self._lock:
            self._read()
            counts = dict(self._requests.most_common())
            self._requests.clear()
            return counts
