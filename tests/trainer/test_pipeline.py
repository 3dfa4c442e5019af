"""End to end through the CLI: stage order, learning, summary and termination message, reruns, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dpo_dev.hub import LocalHub
from dpo_trainer import pipeline
from dpo_trainer.context import RunContext
from dpo_trainer.errors import Interrupted
from dpo_trainer.layout import RunLayout
from dpo_trainer.pipeline import STAGES, plan
from dpo_trainer.progress import Reporter
from dpo_trainer.specfile import load_job
from dpo_trainer.training import latest_checkpoint
from dpojob_api.progress import PROGRESS_KIND
from dpojob_api.spec import DPOJobSpec, HubOutput, OutputSpec
from dpojob_api.vocabulary import Stage

from .conftest import (
    DPO_KEYS,
    HUB_TOKEN,
    PUSH_BRANCH,
    PUSH_REPO,
    QUICKSTART,
    REPO,
    CliRun,
    cli_command,
    deep_merge,
    hub_env,
    killed_at,
    quickstart_job,
    run_cli,
)

ALL_STAGES = ["data", "sft", "sft_merge", "dpo_data", "dpo", "dpo_merge", "model_card", "push"]


def test_the_stage_table_is_the_stage_sequence_the_operator_knows() -> None:
    assert tuple(stage.name for stage in STAGES) == tuple(Stage)


def test_stdout_holds_only_progress_events_in_stage_order(quickstart_run: CliRun) -> None:
    events = quickstart_run.events  # every line parses as JSON, or this raises
    assert all(e["kind"] == PROGRESS_KIND and isinstance(e["time"], float) for e in events)
    starts = [e["stage"] for e in events if e["event"] == "stage_start"]
    assert starts == ALL_STAGES
    ends = quickstart_run.stage_ends()
    assert list(ends) == ALL_STAGES
    assert all(e["skipped"] is False and e["seconds"] >= 0 for e in ends.values())
    assert events[-1]["event"] == "done"
    assert not [e for e in events if e["event"] == "error"]


def test_sft_and_dpo_learn(quickstart_run: CliRun) -> None:
    sft = [e["metrics"]["loss"] for e in quickstart_run.logs("sft")]
    assert sft[-1] < sft[0]
    dpo = [e["metrics"] for e in quickstart_run.logs("dpo")]
    assert dpo[-1]["loss"] < dpo[0]["loss"] - 0.1
    assert dpo[-1]["rewards/margins"] > dpo[0]["rewards/margins"] + 0.1
    assert dpo[-1]["rewards/accuracies"] >= 0.9


def test_summary_and_termination_message(quickstart_run: CliRun) -> None:
    summary = quickstart_run.summary()
    assert summary == quickstart_run.events[-1]["summary"]
    metrics = summary["metrics"]
    assert set(metrics) >= DPO_KEYS
    assert {"eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"} <= set(metrics)
    assert set(summary["stages"]) == set(ALL_STAGES)
    counts = {"sft_train": 288, "sft_eval": 32, "dpo_train": 160, "dpo_eval": 32, "dpo_train_dropped_long_prompts": 0}
    assert {k: v for k, v in summary["data"].items() if k != "sources"} == counts  # 160: 40 DPO steps x 4 pairs
    model = summary["model"]
    assert model["directory"].endswith("final-model")
    assert model["repoId"] == PUSH_REPO and model["revision"] == PUSH_BRANCH
    assert model["commitUrl"].endswith(model["commitSha"])
    # What it cost, per training stage, and what it came from (a local base model; the libraries that trained it).
    assert set(summary["efficiency"]) == {"sft", "dpo"}
    for stage, cost in summary["efficiency"].items():
        assert cost["seconds"] > 0 and cost["gpuHours"] == 0 and cost["samplesPerSecond"] > 0, stage
    provenance = summary["provenance"]
    assert provenance["model"]["local"] and provenance["datasets"] == []
    assert {"torch", "transformers", "trl", "peft"} <= set(provenance["libraries"])
    assert (quickstart_run.layout.root / "provenance.json").exists()
    card = quickstart_run.layout.card.read_text()
    assert "## Provenance" in card and f"trl {provenance['libraries']['trl']}" in card and "- dpo: " in card

    raw = quickstart_run.termination_path.read_bytes()
    assert len(raw) <= 4096
    message = json.loads(raw)
    assert message["reason"] == "Succeeded"
    assert message["model"] == model
    assert message["metrics"]["rewards/margins"] == metrics["rewards/margins"]
    assert all(k == "loss" or k.startswith(("rewards/", "eval_")) for k in message["metrics"])
    assert "rewards/accuracies" in quickstart_run.stderr.splitlines()[-1]


def test_token_never_leaks(quickstart_run: CliRun) -> None:
    needle = HUB_TOKEN.encode()
    assert needle not in quickstart_run.stdout.encode() + quickstart_run.stderr.encode()
    assert needle not in quickstart_run.termination_path.read_bytes()
    leaked = [p for p in quickstart_run.out_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []


def test_rerun_of_a_finished_run_skips_every_stage(quickstart_run: CliRun, hub: LocalHub, tmp_path: Path) -> None:
    """Runs last in this module: it rewrites the shared run's summary (same metrics, skipped stages)."""
    spec_file = quickstart_run.out_dir.parent / "quickstart.yaml"
    job = yaml.safe_load(spec_file.read_text())
    again = run_cli(job, quickstart_run.out_dir.parent, "quickstart", env=hub_env(hub))
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(e["skipped"] for e in again.stage_ends().values())
    assert not [e for e in again.events if e["event"] == "log"]
    assert again.summary()["metrics"] == quickstart_run.events[-1]["summary"]["metrics"]


def test_stage_plan_invalidates_only_what_changed() -> None:
    spec = load_job(QUICKSTART).spec
    before = {stage.name: fp for stage, fp in plan(spec)}
    assert list(before) == [s.name for s in STAGES if s.name not in ("gates", "push")]
    beta = spec.model_copy(deep=True)
    beta.dpo.beta = 0.2
    after = {stage.name: fp for stage, fp in plan(beta)}
    assert [n for n in before if before[n] != after[n]] == ["dpo", "dpo_merge", "model_card"]
    no_sft = spec.model_copy(deep=True)
    no_sft.sft.enabled = False
    assert [stage.name for stage, _ in plan(no_sft)] == ["data", "dpo_data", "dpo", "dpo_merge", "model_card"]


def test_settings_that_do_not_shape_the_model_invalidate_nothing() -> None:
    """Pod settings, suspend, checkpoint cadence, trackers or the token's Secret: no new card, no second push."""
    raw = quickstart_job(output={"hub": {"repoId": "me/model"}})["spec"]
    before = {stage.name: fp for stage, fp in plan(DPOJobSpec.model_validate(raw))}
    assert list(before) == ALL_STAGES
    unrelated = {
        "runtime": {"gpus": 2, "memory": "64Gi", "image": "registry.local/trainer:2"},
        "suspend": True,
        "checkpointing": {"saveSteps": 7, "saveTotalLimit": 5, "directory": "/elsewhere"},
        "reporting": {"reportTo": ["tensorboard"]},
        "hubTokenSecretRef": {"name": "other-token"},
    }
    after = {stage.name: fp for stage, fp in plan(DPOJobSpec.model_validate(deep_merge(raw, unrelated)))}
    assert after == before
    pushed_elsewhere = {
        stage.name: fp
        for stage, fp in plan(DPOJobSpec.model_validate(deep_merge(raw, {"output": {"hub": {"repoId": "me/other"}}})))
    }
    assert [n for n in before if before[n] != pushed_elsewhere[n]] == ["model_card", "push"]


def test_gates_run_between_the_card_and_the_push_and_rerun_when_they_change() -> None:
    """With no hub the gates still run (and fail the run on a miss); changing a gate redoes card, gates and push."""
    raw = quickstart_job(output={"gates": {"maxEvalLoss": 1.0}})["spec"]
    assert [stage.name for stage, _ in plan(DPOJobSpec.model_validate(raw))][-2:] == ["model_card", "gates"]
    pushed = deep_merge(raw, {"output": {"hub": {"repoId": "me/model"}}})
    before = {stage.name: fp for stage, fp in plan(DPOJobSpec.model_validate(pushed))}
    assert list(before)[-3:] == ["model_card", "gates", "push"]
    stricter = DPOJobSpec.model_validate(deep_merge(pushed, {"output": {"gates": {"maxEvalLoss": 0.5}}}))
    after = {stage.name: fp for stage, fp in plan(stricter)}
    assert [n for n in before if before[n] != after[n]] == ["model_card", "gates", "push"]


def test_sigterm_during_dpo_saves_a_checkpoint_and_exits_interrupted(tmp_path: Path) -> None:
    """Kubernetes stops a pod with SIGTERM (suspend, preemption): the Trainer's just-in-time checkpoint runs."""
    job = quickstart_job(
        quantization={"mode": "none"},
        sft={"maxSteps": 2},
        dpo={"maxSteps": 5000, "loggingSteps": 5},
        checkpointing={"saveSteps": 5000},
        output={"directory": str(tmp_path / "final-model")},
    )
    command, env, out_dir, termination = cli_command(job, tmp_path, "sigterm", None)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        for line in process.stdout:  # wait until DPO is really training
            if '"event": "log", ' in line and json.loads(line)["stage"] == "dpo":
                process.send_signal(signal.SIGTERM)
                break
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("dpo-trainer: Interrupted: dpo stopped at step ")
    assert json.loads(termination.read_text())["reason"] == "Interrupted"
    assert json.loads(stdout.splitlines()[-1])["event"] == "error"
    layout = RunLayout(out_dir)
    assert latest_checkpoint(layout.stage_dir("dpo")) is not None  # saveSteps alone would not have saved any yet
    assert json.loads(layout.state.read_text())["stages"]["dpo"]["status"] == "running"


def test_resume_after_a_kill_during_dpo(tmp_path: Path) -> None:
    """SIGKILL right after DPO step 6 (checkpoint-4 on disk); the rerun skips data/SFT and resumes DPO at 4."""
    job = quickstart_job(
        quantization={"mode": "none"},
        sft={"maxSteps": 8, "loggingSteps": 2},
        dpo={"maxSteps": 10, "loggingSteps": 2},
        checkpointing={"saveSteps": 4},
        output={"directory": str(tmp_path / "final-model")},
    )
    first = run_cli(job, tmp_path, "resume", env=killed_at("dpo", 6))
    assert first.returncode == -9, first.stderr[-3000:]
    assert [e["step"] for e in first.logs("dpo")] == [2, 4]
    state = json.loads(first.layout.state.read_text())["stages"]
    assert {k: v["status"] for k, v in state.items()} == {
        "data": "done",
        "sft": "done",
        "sft_merge": "done",
        "dpo_data": "done",
        "dpo": "running",
    }
    assert latest_checkpoint(first.layout.stage_dir("dpo")) == str(first.layout.stage_dir("dpo") / "checkpoint-4")

    second = run_cli(job, tmp_path, "resume")
    assert second.returncode == 0, second.stderr[-3000:]
    ends = second.stage_ends()
    assert [s for s, e in ends.items() if e["skipped"]] == ["data", "sft", "sft_merge", "dpo_data"]
    assert not second.logs("sft")
    assert [e["step"] for e in second.logs("dpo")] == [6, 8, 10]
    history = json.loads(second.layout.log_history("dpo").read_text())
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6, 8, 10]


def _stubbed(stub: Callable[[str, RunContext], None]) -> tuple[pipeline.Stage, ...]:
    """The stage table with every stage running stub(stage name, ctx) instead."""
    return tuple(dataclasses.replace(stage, run=functools.partial(stub, stage.name)) for stage in STAGES)


def _run_stubbed(spec: DPOJobSpec, out_dir: Path, fail_at: str | None = None) -> list[str]:
    """pipeline.run with every stage replaced by a stub; the stages that ran (fail_at raises Interrupted)."""
    ran: list[str] = []

    def stub(name: str, ctx: RunContext) -> None:
        ran.append(name)
        if name == fail_at:
            raise Interrupted(f"{name} stopped")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "STAGES", _stubbed(stub))
        patch.setattr("dpo_trainer.hub.check_token", lambda ctx: None)
        with contextlib.suppress(Interrupted):
            pipeline.run(spec, out_dir, Reporter(io.StringIO()), None, {})
    return ran


def test_more_dpo_steps_read_more_pairs_and_keep_the_trained_sft_model(tmp_path: Path) -> None:
    """DPO's pairs are prepared by a stage of their own: a DPO-only change that needs more rows (steps, batch shape)
    prepares the pairs again, and SFT (hours on a GPU at the recipe's scale) is not trained again."""
    spec = load_job(QUICKSTART).spec
    assert _run_stubbed(spec, tmp_path) == ALL_STAGES[:-1]  # no push: the quickstart has no output.hub
    longer = spec.model_copy(deep=True)
    longer.dpo.max_steps *= 2
    assert _run_stubbed(longer, tmp_path) == ["dpo_data", "dpo", "dpo_merge", "model_card"]
    more_sft = longer.model_copy(deep=True)
    more_sft.sft.max_steps *= 2
    assert _run_stubbed(more_sft, tmp_path)[:2] == ["data", "sft"]


def test_a_stage_that_reruns_invalidates_every_later_stage(tmp_path: Path) -> None:
    """Spec A finishes; B (another dpo.beta) is stopped during dpo; back to A, dpo trains again, so the merge, the
    card and the push must run again too, not be skipped on run A's records while DIR/model holds A's old model."""
    spec_a = load_job(QUICKSTART).spec.model_copy(update={"output": OutputSpec(hub=HubOutput(repo_id="me/model"))})
    spec_b = spec_a.model_copy(deep=True)
    spec_b.dpo.beta = 0.2
    assert _run_stubbed(spec_a, tmp_path) == ALL_STAGES
    assert _run_stubbed(spec_b, tmp_path, fail_at="dpo") == ["dpo"]
    stages = set(json.loads(RunLayout(tmp_path).state.read_text())["stages"])
    assert stages == {"data", "sft", "sft_merge", "dpo_data", "dpo"}
    assert _run_stubbed(spec_a, tmp_path) == ["dpo", "dpo_merge", "model_card", "push"]
    assert _run_stubbed(spec_a, tmp_path) == []


def test_only_rank_0_checks_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One whoami per run, not one per GPU (the launcher stops the other ranks when rank 0's check fails)."""
    checked_by: list[str] = []
    monkeypatch.setattr("dpo_trainer.hub.check_token", lambda ctx: checked_by.append(os.environ["RANK"]))
    monkeypatch.setattr(pipeline, "STAGES", _stubbed(lambda name, ctx: None))
    spec = load_job(QUICKSTART).spec.model_copy(update={"output": OutputSpec(hub=HubOutput(repo_id="me/model"))})
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        pipeline.run(spec, tmp_path / rank, Reporter(io.StringIO()), None, {})
    assert checked_by == ["0"]


def test_gpu_memory_per_stage_reaches_the_summary_metrics_and_termination_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA each stage's reading is recorded with it and a training stage's lands in its final metrics; a fake
    reading stands in for the GPU. A rerun that skips the stages still reports what they used."""
    from dpo_trainer import memory

    peaks = {"sft": 6, "sft_merge": 14, "dpo": 9, "dpo_merge": 15}
    current: list[str] = ["data"]

    def reading() -> dict[str, int]:
        gib = 2**30
        peak = peaks.get(current[0], 1) * gib
        return {"allocated": gib // 2, "peak_allocated": peak, "peak_reserved": peak + gib}

    monkeypatch.setattr(memory, "cuda_reading", reading)
    monkeypatch.setattr(pipeline, "STAGES", _stubbed(lambda name, ctx: current.__setitem__(0, name)))
    spec = load_job(QUICKSTART).spec
    summary = pipeline.run(spec, tmp_path, Reporter(io.StringIO()), None, {})
    dpo = {"allocated_at_start_gib": 0.5, "peak_allocated_gib": 9.0, "peak_reserved_gib": 10.0}
    assert summary["stages"]["dpo"] == {"seconds": summary["stages"]["dpo"]["seconds"], "skipped": False, "gpu": dpo}
    assert summary["stages"]["sft_merge"]["gpu"]["peak_allocated_gib"] == 14.0
    assert summary["metrics"] == {f"gpu/{k}": v for k, v in dpo.items()}
    assert summary["sftMetrics"]["gpu/peak_reserved_gib"] == 7.0
    assert pipeline.key_metrics(summary["metrics"]) == summary["metrics"]  # the termination message keeps them
    again = pipeline.run(spec, tmp_path, Reporter(io.StringIO()), None, {})
    assert again["stages"]["dpo"] == {**summary["stages"]["dpo"], "skipped": True}
    assert again["metrics"] == summary["metrics"]


def test_without_cuda_no_stage_has_gpu_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "STAGES", _stubbed(lambda name, ctx: None))
    summary = pipeline.run(load_job(QUICKSTART).spec, tmp_path, Reporter(io.StringIO()), None, {})
    assert not [stage for stage, entry in summary["stages"].items() if "gpu" in entry]
    assert not [key for key in summary["metrics"] if key.startswith("gpu/")]
