"""The CLI contract for bad input: the right reason code, one clear line, exit ≠ 0, a termination message."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dpo_trainer.errors import ALL_ERRORS
from dpojob_api.progress import TERMINATION_PATH_ENV

from .conftest import REPO, assert_failed, quickstart_job, run_cli


def _with(path: list[str], value: Any) -> dict[str, Any]:
    job = quickstart_job()
    node = job["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return job


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (["dpo", "betaa"], 0.1, "spec.dpo.betaa: unknown field"),
        (["dpo", "maxSteps"], "many", "spec.dpo.maxSteps"),
        (["quantization", "mode"], "8bit", "spec.quantization.mode: must be one of '4bit' or 'none'"),
        (["dpo", "maxPromptLength"], 4096, "maxPromptLength (4096) must be less than maxLength (128)"),
    ],
)
def test_invalid_spec_fails_fast(tmp_path: Path, path: list[str], value: Any, fragment: str) -> None:
    started = time.monotonic()
    run = run_cli(_with(path, value), tmp_path)
    assert_failed(run, "InvalidSpec", fragment)
    assert time.monotonic() - started < 10  # no torch import before the spec validates
    assert not run.out_dir.exists()


def test_not_a_dpojob_and_not_yaml(tmp_path: Path) -> None:
    pod = run_cli("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", tmp_path, "pod")
    assert_failed(pod, "InvalidSpec", "exactly one document of kind DPOJob", "['Pod']")
    broken = run_cli("kind: DPOJob\nspec: [unclosed\n", tmp_path, "broken")
    assert_failed(broken, "InvalidSpec", "is not valid YAML")


def test_multi_document_file_uses_the_dpojob(tmp_path: Path) -> None:
    """A manifest bundle (Secret + DPOJob) is accepted; the failure here proves the DPOJob was picked."""
    import yaml

    job = _with(["data", "dpo", "source", "files", "paths"], ["./missing.jsonl"])
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": "x"}}
    run = run_cli(yaml.safe_dump_all([secret, job]), tmp_path)
    assert_failed(run, "DatasetError", "./missing.jsonl")


def test_missing_local_paths(tmp_path: Path) -> None:
    data = run_cli(_with(["data", "dpo", "source", "files", "paths"], ["./no/such.jsonl"]), tmp_path, "data")
    assert_failed(data, "DatasetError", "data.dpo.source.files.paths", "'./no/such.jsonl'", str(REPO / "no/such.jsonl"))
    model = run_cli(_with(["model", "name"], "./no-such-model"), tmp_path, "model")
    assert_failed(model, "ModelLoadError", "model.name", str(REPO / "no-such-model"))


def test_missing_dataset_column_names_it_and_the_columns_that_exist(tmp_path: Path) -> None:
    run = run_cli(_with(["data", "dpo", "chosenTemplate"], "{answer}"), tmp_path)
    line = assert_failed(run, "DatasetError", "data.dpo.chosenTemplate", "'answer'")
    assert "columns: qid, question, date, metadata, response_j, response_k" in line
    assert [e["stage"] for e in run.events if e["event"] == "stage_start"] == ["data"]
    assert run.termination["stage"] == "data", "the termination message names the stage the run stopped in"


def test_missing_model_on_the_hub_offline(tmp_path: Path) -> None:
    run = run_cli(_with(["model", "name"], "no-such-org/no-such-model"), tmp_path)
    assert_failed(run, "ModelLoadError", "no-such-org/no-such-model")
    assert "Traceback" in run.layout.debug_log.read_text()


def test_unwritable_termination_path_is_skipped(tmp_path: Path) -> None:
    run = run_cli(_with(["dpo", "betaa"], 1), tmp_path, env={TERMINATION_PATH_ENV: "/proc/no/such/termination-log"})
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("dpo-trainer: InvalidSpec: ")


def test_help_is_fast_and_documents_exit_codes() -> None:
    script = Path(sys.executable).with_name("dpo-trainer")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "dpo_trainer.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, check=True)
    assert "run" in result.stdout
    assert "InvalidSpec=2" in result.stdout and "Interrupted=143" in result.stdout
    heavy = {"torch", "transformers", "trl", "peft", "datasets", "huggingface_hub", "matplotlib"}
    probe = f"import sys, dpo_trainer.cli, dpo_trainer.pipeline; print(sorted({heavy!r} & set(sys.modules)))"
    light = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert light.stdout.strip() == "[]", "the stage table imports the stages: they must import these lazily"


def test_exit_codes_are_distinct() -> None:
    codes = [e.exit_code for e in ALL_ERRORS]
    assert len(set(codes)) == len(codes) and 0 not in codes and 1 not in codes


def test_sigterm_is_ignored_once_the_outcome_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's SIGTERM to a rank that is already exiting must not print a KeyboardInterrupt traceback."""
    import signal

    from dpo_trainer import cli

    monkeypatch.setenv(TERMINATION_PATH_ENV, str(tmp_path / "termination-log"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["run", str(tmp_path / "missing.yaml")]) == 2
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_gpus_asked_for_on_a_machine_without_cuda_fail_before_anything_runs(tmp_path: Path) -> None:
    """No silent CPU fallback: this CPU-only torch cannot serve runtime.gpus: 1, so nothing is loaded or trained."""
    job = _with(["runtime", "gpus"], 1)
    run = run_cli(job, tmp_path, env={"NVIDIA_VISIBLE_DEVICES": "all"})
    line = assert_failed(
        run,
        "GPUUnavailable",
        "spec.runtime.gpus is 1 but torch cannot use CUDA: torch ",
        " is a CPU-only build; ",
        "0 CUDA devices visible; NVIDIA_VISIBLE_DEVICES='all'.",
        "or set spec.runtime.gpus: 0 to train on CPU",
    )
    assert run.termination["message"] in line
    assert not run.out_dir.exists()  # no stage directory, no state, no data
    assert [e["event"] for e in run.events] == ["error"]
