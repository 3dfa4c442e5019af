"""How the operator logs: Kopf's handler on the root logger at the level the settings ask for, as text or as JSON
lines (the chart values logFormat and logLevel).

A JSON line is one object: time (RFC 3339, UTC), level, logger, message, and for a record about one object its
kind, namespace and name. Kopf's per-object loggers put the object on their records (`k8s_ref`); the operator's
own records about a DPOJob carry it the same way, through `extra=about(namespace, name)`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from dpojob_api.spec import API_GROUP, API_VERSION, KIND

TEXT_FORMAT = kopf.LogFormat.FULL


def about(namespace: str, name: str) -> dict[str, Any]:
    """`extra` of a log record about one DPOJob: as Kopf's per-object loggers mark theirs."""
    return {"k8s_ref": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "namespace": namespace, "name": name}}


class JsonLines(logging.Formatter):
    """One JSON object per record, on one line (a traceback is a field, never more lines)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict):
            line.update({key: ref[key] for key in ("kind", "namespace", "name") if ref.get(key)})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(log_format: str, level: str) -> None:
    """Kopf's logging set-up (one handler on the root logger, asyncio's chatter off), then the level and, for
    json, our formatter on that handler. Below DEBUG, Kopf's per-event "Handler … succeeded" lines (INFO) are left
    out (a share of its CPU: docs/benchmarks.md); its warnings and errors still show."""
    json_lines = log_format == "json"
    kopf.configure(verbose=level == "DEBUG", log_format=kopf.LogFormat.JSON if json_lines else TEXT_FORMAT)
    root = logging.getLogger()
    root.setLevel(level)
    if json_lines:
        for handler in root.handlers:
            if type(handler).__module__.startswith("kopf."):  # the one kopf.configure() added
                handler.setFormatter(JsonLines())
    numeric = logging.getLevelName(level)
    # A child logger's own level decides for its records (the root's does not): never below the chosen one.
    logging.getLogger("kopf.objects").setLevel(
        logging.NOTSET if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    )
