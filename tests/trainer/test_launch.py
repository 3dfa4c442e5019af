"""Several processes in one pod (dpo_trainer.launch): the CLI launches them itself; here 2 gloo workers on CPU."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from dpo_dev.hub import LocalHub
from dpo_trainer.errors import DatasetError, Interrupted, InvalidSpec, OutOfMemory, TrainingError
from dpo_trainer.launch import NPROC_ENV, Exit, Report, processes, root_cause

from .conftest import CliRun, assert_failed, deep_merge, hub_env, killed_at, quickstart_job, run_cli

NPROC = ["--nproc", "2"]
PER_DEVICE_BATCH = 4  # quickstart's batchSize, gradientAccumulationSteps 1


def small_job(**overrides: Any) -> dict[str, Any]:
    """The quickstart cut to a few steps: two workers on two cores must stay quick."""
    steps = {"maxSteps": 6, "loggingSteps": 2, "evalSteps": 6}
    small = {"sft": steps, "dpo": steps, "data": {"sft": {"evalSize": 8}, "dpo": {"evalSize": 8}}}
    return quickstart_job(**deep_merge(small, overrides))


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> CliRun:
    tmp = tmp_path_factory.mktemp("two-workers")
    run = run_cli(small_job(output={"directory": str(tmp / "final-model")}), tmp, "two", args=NPROC)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def test_rank_0_alone_reports_each_stage_once(two_workers: CliRun) -> None:
    events = two_workers.events
    starts = [e["stage"] for e in events if e["event"] == "stage_start"]
    assert starts == ["data", "sft", "sft_merge", "dpo_data", "dpo", "dpo_merge", "model_card"]
    assert list(two_workers.stage_ends()) == starts
    for stage in ("sft", "dpo"):
        assert [e["step"] for e in two_workers.logs(stage)] == [2, 4, 6]
    assert [e["event"] for e in events].count("done") == 1 and events[-1]["event"] == "done"
    assert not [e for e in events if e["event"] == "error"]
    assert two_workers.stderr.count("dpo-trainer: done in ") == 1


def test_both_ranks_train_on_their_own_shards(two_workers: CliRun) -> None:
    summary = two_workers.summary()
    both = {"worldSize": 2, "backend": "gloo", "globalBatchSize": 2 * PER_DEVICE_BATCH}
    assert summary["parallelism"] == {"sft": both, "dpo": both}
    # Epochs advance by the global batch: each rank took different pairs (one process would be half as far).
    rows = summary["data"]["dpo_train"]
    for log in two_workers.logs("dpo"):
        assert log["epoch"] == pytest.approx(log["step"] * 2 * PER_DEVICE_BATCH / rows)


def test_data_prepared_and_model_merged_once_by_rank_0(two_workers: CliRun) -> None:
    """Rank 1 skips the main-only stages; a second writer would show a second dataset or model save."""
    assert two_workers.stderr.count("Saving the dataset (0/1 shards)") == 4  # sft/dpo x train/eval
    summary = two_workers.summary()
    assert summary["data"]["dpo_train"] == 6 * 4 * 2  # maxSteps x batchSize x 2 ranks: read once, for both
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(summary["model"]["directory"])
    assert model.config.model_type == "llama"
    message = two_workers.termination
    assert message["reason"] == "Succeeded" and message["model"] == summary["model"]
    assert message["metrics"]["rewards/margins"] == summary["metrics"]["rewards/margins"]


def test_a_rank_that_dies_is_named_with_a_reason(tmp_path: Path) -> None:
    run = run_cli(small_job(), tmp_path, env=killed_at("sft", 1, rank=1), args=NPROC)
    assert_failed(run, "TrainingError", "rank 1 was killed by SIGKILL")
    assert [e["event"] for e in run.events].count("error") == 1


def test_a_failure_reported_by_a_rank_keeps_its_reason_and_exit_code(tmp_path: Path) -> None:
    run = run_cli(small_job(data={"dpo": {"chosenTemplate": "{answer}"}}), tmp_path, args=NPROC)
    assert_failed(run, "DatasetError", "rank 0: data.dpo.chosenTemplate", "'answer'")
    assert [e["event"] for e in run.events].count("error") == 1


def test_a_token_refused_before_training_stops_every_rank(hub: LocalHub, tmp_path: Path) -> None:
    """Rank 0 alone asks the Hub; when it fails, the rank waiting for it is stopped, not left hanging."""
    job = small_job(output={"hub": {"repoId": "tester/never-pushed"}})
    started = time.monotonic()
    run = run_cli(job, tmp_path, env=hub_env(hub, "bad-token-0123456789"), args=NPROC, timeout=120)
    assert_failed(run, "HubAuthError", "rank 0: ", "HTTP 401")
    assert time.monotonic() - started < 60
    assert not [e for e in run.events if e["event"] == "stage_start"]


def _report(rank: int, at: float, reason: str, message: str = "boom") -> Report:
    return Report(rank, at, {"reason": reason, "message": message})


def test_root_cause_earliest_own_failure_beats_the_ranks_stopped_after_it() -> None:
    reports = {
        0: _report(0, 100.5, "Interrupted", "stopped"),
        1: _report(1, 100.0, "OutOfMemory", "CUDA out of memory"),
        2: _report(2, 100.2, "TrainingError", "Connection closed by peer"),
    }
    exits = {0: Exit(143, 100), 1: Exit(7, 100), 2: Exit(8, 100), 3: Exit(-signal.SIGKILL, 130)}  # 3: stopped at 30 s
    error = root_cause(reports, exits)
    assert isinstance(error, OutOfMemory) and error.message == "rank 1: CUDA out of memory"
    assert error.exit_code == 7


def test_root_cause_a_crash_beats_the_failures_it_causes() -> None:
    reports = {0: _report(0, 100.3, "TrainingError", "Connection closed by peer")}
    exits = {0: Exit(8, 100), 1: Exit(-signal.SIGSEGV, 100)}
    error = root_cause(reports, exits)
    assert isinstance(error, TrainingError) and error.message.startswith("rank 1 was killed by SIGSEGV")


def test_root_cause_interrupted_when_only_stopped() -> None:
    reports = {1: _report(1, 5.0, "Interrupted", "dpo stopped at step 3"), 0: _report(0, 5.1, "Interrupted", "x")}
    error = root_cause(reports, {0: Exit(143, 5), 1: Exit(143, 5), 2: Exit(-signal.SIGTERM, 5)})
    assert isinstance(error, Interrupted) and error.message == "x"
    assert isinstance(root_cause({0: _report(0, 1.0, "DatasetError")}, {0: Exit(3, 1)}), DatasetError)


def test_processes_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in (NPROC_ENV, "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert processes(None, 1) == 1 and processes(3, 1) == 3  # CPU: only when asked for
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert processes(None, 2) == 2 and processes(1, 2) == 1
    assert processes(None, 1) == 1  # the spec's runtime.gpus bounds what a host shows
    assert processes(None, 0) == 1  # no GPU asked for: one CPU process, not one per visible GPU
    with pytest.raises(InvalidSpec, match="only 2 CUDA devices"):
        processes(4, 4)
    monkeypatch.setenv(NPROC_ENV, "1")
    assert processes(None, 2) == 1
    monkeypatch.setenv(NPROC_ENV, "two")
    with pytest.raises(InvalidSpec, match=NPROC_ENV):
        processes(None, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a worker: never launches again
    assert processes(4, 4) == 1
