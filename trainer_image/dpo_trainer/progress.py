"""The trainer's side of the trainer → operator contract: JSON progress lines on stdout and the termination message.

The formats, kinds, reasons and limits are dpojob_api.progress's, shared with the operator that reads them.
Non-finite floats become null so every line is strict JSON; the termination message is built as the operator's
TerminationMessage, so the trainer never writes a field the operator would drop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, TextIO

from dpo_trainer.errors import one_line, scrub
from dpojob_api.progress import (
    TERMINATION_MESSAGE_LIMIT,
    TERMINATION_MESSAGE_PATH,
    TERMINATION_PATH_ENV,
    ProgressLine,
    StageStart,
    TerminationMessage,
    metric_priority,
)
from dpojob_api.vocabulary import Reason, Stage


def to_json_safe(value: Any) -> Any:
    """Replace NaN/inf (which json.dumps would emit as invalid JSON) with None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return to_json_safe(value.item())
    return value


class Reporter:
    """Writes progress events, one flushed JSON line each, from the main process only."""

    def __init__(self, stream: TextIO, *, enabled: bool = True, secrets: tuple[str, ...] = ()) -> None:
        self.stream = stream
        self.enabled = enabled
        self.secrets = secrets
        self.stage: Stage | None = None
        """The stage started last: a failure's termination message names it (status.stage of a failed run)."""

    def emit(self, event: ProgressLine) -> None:
        if isinstance(event, StageStart):
            self.stage = event.stage
        if not self.enabled:
            return
        line = scrub(event.line(), self.secrets)
        self.stream.write(line + "\n")
        self.stream.flush()


def _encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(to_json_safe(payload), separators=(",", ":"), allow_nan=False).encode()


def fit_termination_message(payload: dict[str, Any], limit: int = TERMINATION_MESSAGE_LIMIT) -> bytes:
    """Encode payload as JSON of at most `limit` bytes (Kubernetes truncates the termination message at 4 KiB).

    Metrics are dropped least-important first, then the message is shortened, so the result is always
    valid JSON that still carries the reason.
    """
    payload = TerminationMessage.model_validate(to_json_safe(payload)).to_document()
    data = _encode(payload)
    if len(data) <= limit:
        return data
    metrics = dict(payload.get("metrics") or {})
    for key in sorted(metrics, key=lambda k: (metric_priority(k), k), reverse=True):
        del metrics[key]
        payload["metrics"] = metrics
        data = _encode(payload)
        if len(data) <= limit:
            return data
    message = str(payload.get("message", ""))
    while len(data) > limit and message:
        message = message[: max(0, len(message) - (len(data) - limit) - 3)] + "..." if len(message) > 3 else ""
        payload["message"] = message
        data = _encode(payload)
    if len(data) > limit:
        data = _encode({"reason": payload.get("reason", Reason.TRAINING_ERROR.value)})
    return data


def write_termination_message(payload: dict[str, Any], secrets: tuple[str, ...] = ()) -> None:
    """Write the message where TERMINATION_PATH_ENV says (default TERMINATION_MESSAGE_PATH); skip if unwritable."""
    path = Path(os.environ.get(TERMINATION_PATH_ENV, TERMINATION_MESSAGE_PATH))
    if "message" in payload:
        payload = {**payload, "message": one_line(scrub(str(payload["message"]), secrets))}
    data = scrub(fit_termination_message(payload).decode(), secrets).encode()
    with contextlib.suppress(OSError):
        path.write_bytes(data)
