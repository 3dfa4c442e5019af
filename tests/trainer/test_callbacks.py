"""Progress events from the Trainer callbacks, checked on the shared quickstart run."""

from __future__ import annotations

from .conftest import DPO_KEYS, CliRun


def test_log_events_carry_step_totals_and_every_metric(quickstart_run: CliRun) -> None:
    logs = quickstart_run.logs("dpo")
    assert [e["step"] for e in logs] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(e["totalSteps"] == 40 and e["epoch"] > 0 for e in logs)
    assert all(set(e["metrics"]) >= DPO_KEYS for e in logs)
    evals = [e for e in quickstart_run.events if e["event"] == "log" and "eval_loss" in e["metrics"]]
    assert {e["stage"] for e in evals} == {"sft", "dpo"}
    assert {f"eval_{k}" for k in DPO_KEYS - {"grad_norm", "learning_rate"}} <= set(evals[-1]["metrics"])
    assert [e["step"] for e in quickstart_run.logs("sft")] == [5, 10, 15, 20, 25, 30]
