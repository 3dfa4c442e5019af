"""The Trainer callbacks: progress events (checked on the shared quickstart run) and stop rules."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import TrainerControl, TrainerState, TrainingArguments

from dpo_trainer.callbacks import StopRulesCallback
from dpo_trainer.progress import Reporter
from dpojob_api.spec import DPOJobSpec, StopRule
from dpojob_api.vocabulary import Reason, Stage

from .conftest import DPO_KEYS, CliRun, assert_failed, quickstart_job, run_cli


def test_log_events_carry_step_totals_and_every_metric(quickstart_run: CliRun) -> None:
    logs = quickstart_run.logs("dpo")
    assert [e["step"] for e in logs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(e["totalSteps"] == 40 and e["epoch"] > 0 for e in logs)
    assert all(set(e["metrics"]) >= DPO_KEYS for e in logs)
    evals = [e for e in quickstart_run.events if e["event"] == "log" and "eval_loss" in e["metrics"]]
    assert {e["stage"] for e in evals} == {"sft", "dpo"}
    assert {f"eval_{k}" for k in DPO_KEYS - {"grad_norm", "learning_rate"}} <= set(evals[-1]["metrics"])
    assert [e["step"] for e in quickstart_run.logs("sft")] == [5, 10, 15, 20, 25, 30]


# --- stop rules ---------------------------------------------------------------------------------------------


def _rules_callback(stage: Stage, rules: list[dict], builtins: bool = True) -> tuple[StopRulesCallback, io.StringIO]:
    stream = io.StringIO()
    parsed = [StopRule.model_validate(rule) for rule in rules]
    return StopRulesCallback(Reporter(stream), stage, parsed, builtins), stream


def _log(callback: StopRulesCallback, step: int, **metrics: float) -> TrainerControl:
    state, control = TrainerState(), TrainerControl()
    state.global_step = step
    callback.on_log(TrainingArguments(output_dir="/tmp/unused", report_to=[]), state, control, logs=metrics)
    return control


def test_a_rule_counts_consecutive_logs_that_carry_its_metric_from_its_step_on() -> None:
    rule = {"name": "flat", "metric": "rewards/margins", "comparison": "<", "threshold": 0.1}
    callback, stream = _rules_callback(Stage.DPO, [{**rule, "afterStep": 10, "forLogs": 3, "action": "finish"}])
    assert not _log(callback, 5, **{"rewards/margins": 0.0}).should_training_stop  # before afterStep
    assert not _log(callback, 10, **{"rewards/margins": 0.05}).should_training_stop
    assert not _log(callback, 10, eval_loss=0.5).should_training_stop  # no margin: neither counts nor breaks
    assert not _log(callback, 15, **{"rewards/margins": 0.5}).should_training_stop  # breaks the streak
    for step in (20, 25):
        assert not _log(callback, step, **{"rewards/margins": 0.01}).should_training_stop
    control = _log(callback, 30, **{"rewards/margins": 0.02})
    assert control.should_training_stop and control.should_save
    assert callback.stop is not None and callback.stop.action == "finish"
    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["event"] == "rule" and event["rule"] == "flat" and event["action"] == "finish"
    assert event["reason"] == Reason.STOPPED_BY_RULE and event["step"] == 30
    assert "rewards/margins < 0.1 for 3 logs from step 10 (at step 30: 0.02)" in event["message"]


def test_a_warn_rule_reports_once_and_training_goes_on() -> None:
    rule = {"name": "low-acc", "metric": "rewards/accuracies", "comparison": "<=", "threshold": 0.5, "action": "warn"}
    callback, stream = _rules_callback(Stage.DPO, [rule])
    for step in (5, 10, 15):
        assert not _log(callback, step, **{"rewards/accuracies": 0.4}).should_training_stop
    assert callback.stop is None
    (event,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert event["action"] == "warn" and event["reason"] == Reason.METRIC_RULE


def test_a_non_finite_loss_fails_at_once_unless_the_builtins_are_off() -> None:
    callback, _ = _rules_callback(Stage.SFT, [])
    control = _log(callback, 7, loss=math.nan)
    assert control.should_training_stop and callback.stop is not None
    assert callback.stop.reason == Reason.DIVERGED and "loss is nan at step 7" in callback.stop.message
    assert "spec.sft.learningRate" in callback.stop.message
    off, _ = _rules_callback(Stage.SFT, [], builtins=False)
    assert not _log(off, 7, loss=math.inf).should_training_stop and off.stop is None


def test_likelihood_displacement_warns_when_both_log_probabilities_fall_while_the_margin_grows() -> None:
    callback, stream = _rules_callback(Stage.DPO, [])
    for step in range(1, 6):  # chosen and rejected both fall, the margin grows: displacement
        metrics = {"logps/chosen": -10.0 - step, "logps/rejected": -12.0 - 2 * step, "rewards/margins": 0.1 * step}
        assert not _log(callback, step * 5, **metrics).should_training_stop
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["reason"] for e in events] == [Reason.LIKELIHOOD_DISPLACEMENT]
    healthy, quiet = _rules_callback(Stage.DPO, [])
    for step in range(1, 8):  # the chosen answers get likelier: healthy
        metrics = {"logps/chosen": -10.0 + step, "logps/rejected": -12.0 - step, "rewards/margins": 0.1 * step}
        _log(healthy, step * 5, **metrics)
    assert quiet.getvalue() == ""


def test_rule_names_are_unique_and_thresholds_finite() -> None:
    rule = {"name": "x", "metric": "loss", "comparison": ">", "threshold": 1.0}
    with pytest.raises(ValidationError, match="stop rule names must be unique"):
        DPOJobSpec.model_validate({"output": {"directory": "/o"}, "dpo": {"stopRules": [rule, rule]}})
    with pytest.raises(ValidationError):
        DPOJobSpec.model_validate({"output": {"directory": "/o"}, "dpo": {"stopRules": [{**rule, "threshold": "nan"}]}})


def _quick_dpo_with(rules: list[dict]) -> dict:
    return quickstart_job(sft={"enabled": False}, dpo={"stopRules": rules})


def test_a_fail_rule_stops_the_real_trainer_with_a_checkpoint_and_nothing_merged(tmp_path: Path) -> None:
    rule = {"name": "always", "metric": "loss", "comparison": ">", "threshold": -1.0, "afterStep": 10}
    run = run_cli(_quick_dpo_with([rule]), tmp_path)
    assert_failed(run, "StoppedByRule", "stop rule always: loss > -1 from step 10 (at step 10:")
    assert [e["step"] for e in run.logs("dpo")] == [5, 10]
    assert (run.layout.stage_dir(Stage.DPO) / "checkpoint-10" / "trainer_state.json").exists()
    assert Stage.DPO_MERGE not in [e["stage"] for e in run.events if e["event"] == "stage_start"]
    assert [e["rule"] for e in run.events if e["event"] == "rule"] == ["always"]


def test_a_finish_rule_stops_early_and_the_run_goes_on_to_merge_and_a_warn_rule_only_reports(tmp_path: Path) -> None:
    rules = [
        {
            "name": "plateau",
            "metric": "loss",
            "comparison": ">",
            "threshold": -1.0,
            "afterStep": 15,
            "action": "finish",
        },
        {"name": "noted", "metric": "loss", "comparison": ">", "threshold": -1.0, "forLogs": 2, "action": "warn"},
        {"name": "never", "metric": "loss", "comparison": "<", "threshold": -1.0},
    ]
    run = run_cli(_quick_dpo_with(rules), tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [e["step"] for e in run.logs("dpo")] == [5, 10, 15]
    fired = [(e["rule"], e["action"], e["step"]) for e in run.events if e["event"] == "rule"]
    assert fired == [("noted", "warn", 10), ("plateau", "finish", 15)]
    assert (run.layout.model / "config.json").exists() and run.termination["reason"] == "Succeeded"
