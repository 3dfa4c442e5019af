"""Logging: text or JSON lines at the configured level (the chart values logFormat, logLevel), each JSON line
naming the object a record is about; `dpo-operator --version`; the start-up line with the version and settings."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpo_operator import __version__, logs, main

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root, objects = logging.getLogger(), logging.getLogger("kopf.objects")
    handlers, level, objects_level = root.handlers[:], root.level, objects.level
    yield
    root.handlers[:], root.level = handlers, level
    objects.setLevel(objects_level)


def record(name: str = "dpo_operator.reconciler", level: int = logging.WARNING, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord(name, level, __file__, 1, "reconcile of %s failed", ("ml/llama",), None)
    entry.__dict__.update(extra)
    return entry


def test_json_lines_name_the_dpojob_a_record_is_about() -> None:
    line = json.loads(logs.JsonLines().format(record(**logs.about("ml", "llama"))))
    assert line["level"] == "WARNING" and line["logger"] == "dpo_operator.reconciler"
    assert line["message"] == "reconcile of ml/llama failed" and line["time"].endswith("Z")
    assert (line["kind"], line["namespace"], line["name"]) == ("DPOJob", "ml", "llama")
    plain = json.loads(logs.JsonLines().format(record()))
    assert not {"kind", "namespace", "name"} & plain.keys()


def test_kopf_per_object_records_and_tracebacks_stay_one_line() -> None:
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "llama-g1", "uid": "u", "namespace": "ml"}
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        entry = record("kopf.objects", logging.ERROR, k8s_ref=ref, exc_info=sys.exc_info())
    text = logs.JsonLines().format(entry)
    assert "\n" not in text
    line = json.loads(text)
    assert (line["kind"], line["namespace"], line["name"]) == ("Job", "ml", "llama-g1")
    assert "ValueError: boom" in line["exception"]


@pytest.mark.parametrize(
    ("log_format", "level", "kopf_objects"),
    [("json", "INFO", logging.WARNING), ("text", "DEBUG", logging.NOTSET), ("json", "ERROR", logging.ERROR)],
)
def test_configure_sets_the_level_and_the_format(log_format: str, level: str, kopf_objects: int) -> None:
    logs.configure(log_format, level)
    root = logging.getLogger()
    assert root.level == logging.getLevelName(level)
    ours = [h for h in root.handlers if type(h).__module__.startswith("kopf.")]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, logs.JsonLines) is (log_format == "json")
    assert logging.getLogger("kopf.objects").level == kopf_objects, "Kopf's per-event lines only when debugging"


def test_version_prints_and_exits_zero() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "dpo-operator"), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dpo-operator {__version__}" and __version__ != "0+unknown"


class Started(Exception):
    """Stops cli() right after its start-up line."""


def test_start_up_line_has_the_version_and_settings_but_no_env_values(monkeypatch, capsys) -> None:
    def stop(*_: object) -> None:
        raise Started

    monkeypatch.setattr(main.health, "serve", stop)
    monkeypatch.setattr(sys, "argv", ["dpo-operator"])
    monkeypatch.setenv("DPO_OPERATOR_LOG_FORMAT", "json")
    monkeypatch.setenv("DPO_OPERATOR_TRAINER_ENV", '[{"name": "HTTPS_PROXY", "value": "http://u:secret@proxy"}]')
    monkeypatch.setenv("DPO_OPERATOR_TRAINER_DEFAULTS", '{"nodeSelector": {"pool": "gpu"}}')
    with pytest.raises(Started):
        main.cli()
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    started = next(line for line in lines if line["message"].startswith("dpo-operator "))
    assert started["level"] == "INFO" and started["logger"] == "dpo_operator"
    assert __version__ in started["message"] and "secret" not in started["message"]
    shown = json.loads(started["message"].split(" settings ", 1)[1])
    assert shown["trainer_env"] == ["HTTPS_PROXY"] and shown["trainer_defaults"] == {"nodeSelector": {"pool": "gpu"}}
    assert shown["log_format"] == "json" and shown["log_level"] == "INFO"
