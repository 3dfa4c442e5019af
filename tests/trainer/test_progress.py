"""Progress events and the termination message: strict JSON, size-capped, token-free."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dpo_trainer.progress import Reporter, fit_termination_message, write_termination_message
from dpojob_api.progress import (
    PROGRESS_KIND,
    TERMINATION_MESSAGE_LIMIT,
    TERMINATION_PATH_ENV,
    Done,
    ProgressEvent,
    StageEnd,
    StageLog,
    TerminationMessage,
)
from dpojob_api.vocabulary import Stage


def test_events_are_flushed_json_lines_with_nan_as_null() -> None:
    stream = io.StringIO()
    reporter = Reporter(stream, secrets=("tok-123456",))
    metrics = {"loss": float("nan"), "x": float("inf"), "note": "tok-123456"}
    reporter.emit(StageLog(stage=Stage.DPO, step=1, totalSteps=2, metrics=metrics))
    reporter.emit(StageEnd(stage=Stage.DPO, seconds=1.5, skipped=False))
    lines = stream.getvalue().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["kind"] == PROGRESS_KIND and first["event"] == "log" and isinstance(first["time"], float)
    assert first["metrics"] == {"loss": None, "x": None, "note": "***"}
    assert second == {**second, "event": "stage_end", "stage": "dpo", "seconds": 1.5, "skipped": False}
    assert ProgressEvent.model_validate(second).skipped is False  # what the operator accepts


def test_disabled_reporter_is_silent() -> None:
    stream = io.StringIO()
    Reporter(stream, enabled=False).emit(Done(summary={}))
    assert stream.getvalue() == ""


def test_small_payload_is_unchanged() -> None:
    payload = {"reason": "Succeeded", "metrics": {"loss": 0.5}, "model": {"directory": "/out"}}
    assert json.loads(fit_termination_message(payload)) == payload


def test_the_trainer_writes_only_what_the_operator_reads_back_unchanged() -> None:
    payload = {
        "reason": "Succeeded",
        "metrics": {"loss": float("nan"), "rewards/margins": 0.5, "gpu/peak": 3},
        "model": {"directory": "/out", "repoId": "org/m", "private": True},
    }
    written = fit_termination_message(payload)
    assert json.loads(written) == {
        "reason": "Succeeded",
        "metrics": {"rewards/margins": 0.5, "gpu/peak": 3.0},
        "model": {"directory": "/out", "repoId": "org/m"},
    }
    assert TerminationMessage.parse(written.decode()).to_document() == json.loads(written)


def test_oversized_metrics_drop_least_important_first() -> None:
    metrics = {f"eval_extra_metric_{i:03d}": float(i) for i in range(300)}
    metrics |= {"rewards/margins": 0.5, "rewards/accuracies": 1.0, "loss": 0.4, "eval_loss": 0.41}
    data = fit_termination_message({"reason": "Succeeded", "metrics": metrics, "model": {"directory": "/out"}})
    assert len(data) <= TERMINATION_MESSAGE_LIMIT
    kept = json.loads(data)
    assert {"rewards/margins", "rewards/accuracies", "loss", "eval_loss"} <= set(kept["metrics"])
    assert kept["model"] == {"directory": "/out"}


def test_oversized_message_is_shortened() -> None:
    data = fit_termination_message({"reason": "TrainingError", "message": "é" * 10_000})
    assert len(data) <= TERMINATION_MESSAGE_LIMIT
    decoded = json.loads(data)
    assert decoded["reason"] == "TrainingError" and decoded["message"].endswith("...")


def test_write_termination_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_PATH_ENV, str(target))
    write_termination_message({"reason": "HubError", "message": "push\nfailed with secret-abcdef"}, ("secret-abcdef",))
    assert json.loads(target.read_text()) == {"reason": "HubError", "message": "push failed with ***"}
    monkeypatch.setenv(TERMINATION_PATH_ENV, str(tmp_path / "missing-dir" / "log"))
    write_termination_message({"reason": "HubError", "message": "x"})  # unwritable: skipped, no exception
