"""The `gates` stage: output.gates checked against the final DPO evaluation, between the card and the push.

A stage of its own so a failed gate stops the run before anything is pushed, and so resume treats it like
every other step: it reruns when the gate settings (or anything before them) change. Thresholds compare the
final eval metrics (the dpo stage's log history); notWorseThanTarget compares eval rewards/accuracies and
margins with what the card at output.hub.revision records (RunLayout.target, read by the card stage). The
verdict goes to RunLayout.gates_result: every check with its numbers, and notes on comparisons that could not
be made (no model or card at the target: the gate passes).
"""

from __future__ import annotations

import sys
from typing import Any

from dpo_trainer.context import RunContext
from dpo_trainer.errors import QualityGateFailed
from dpo_trainer.training import stage_metrics
from dpojob_api.spec import QualityGates
from dpojob_api.vocabulary import Stage

THRESHOLDS = (  # (field, name in the spec, metric, higher is better)
    ("min_eval_reward_accuracy", "minEvalRewardAccuracy", "eval_rewards/accuracies", True),
    ("min_eval_reward_margin", "minEvalRewardMargin", "eval_rewards/margins", True),
    ("max_eval_loss", "maxEvalLoss", "eval_loss", False),
)
NOT_WORSE = ("eval_rewards/accuracies", "eval_rewards/margins")
"""What notWorseThanTarget compares: higher is better for both."""


def label(metric: str) -> str:
    """eval_rewards/accuracies -> "eval rewards/accuracies", as the messages say it."""
    return metric.replace("_", " ", 1)


def numbers(value: float, limit: float) -> tuple[str, str]:
    """Both numbers short, but never printed alike when they differ (0.59999 < 0.6, not 0.6 < 0.6)."""
    digits = next((d for d in (4, 8) if value == limit or f"{value:.{d}g}" != f"{limit:.{d}g}"), 17)
    return f"{value:.{digits}g}", f"{limit:.{digits}g}"


def compare(
    gate: str, metric: str, value: float | None, limit: float, higher_is_better: bool, against: str
) -> dict[str, Any]:
    """One check: {"gate", "metric", "value", "limit", "passed", "message"}; a missing metric fails. `against` says
    what the limit is, with a {limit} placeholder."""
    if value is None:
        message = f"{gate}: {label(metric)} is missing from the final DPO evaluation"
        return {"gate": gate, "metric": metric, "value": None, "limit": limit, "passed": False, "message": message}
    passed = value >= limit if higher_is_better else value <= limit
    symbol = {(True, True): ">=", (True, False): "<", (False, True): "<=", (False, False): ">"}[
        (higher_is_better, passed)
    ]
    shown, limit_shown = numbers(value, limit)
    message = f"{label(metric)} {shown} {symbol} {against.format(limit=limit_shown)}"
    return {"gate": gate, "metric": metric, "value": value, "limit": limit, "passed": passed, "message": message}


def check(
    gates: QualityGates, metrics: dict[str, float], target: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(checks, notes): one check per compared number; notes say which comparison could not be made and why."""
    checks = [
        compare(gate, metric, metrics.get(metric), limit, higher_is_better, f"{gate} {{limit}}")
        for field, gate, metric, higher_is_better in THRESHOLDS
        if (limit := getattr(gates, field)) is not None
    ]
    notes: list[str] = []
    if gates.not_worse_than_target:
        assert target is not None  # notWorseThanTarget needs output.hub, and with it the card stage reads the target
        where = f"{target['repoId']}@{target['revision']}"
        recorded = target.get("metrics") or {}
        if target.get("commitSha") is None:
            notes.append(f"notWorseThanTarget: nothing at {where} yet: passed")
        elif not target.get("card"):
            notes.append(f"notWorseThanTarget: {where} has no model card: passed")
        elif not any(m in recorded for m in NOT_WORSE):
            notes.append(f"notWorseThanTarget: the model card at {where} records no eval rewards: passed")
        checks += [
            compare("notWorseThanTarget", m, metrics.get(m), recorded[m], True, f"{{limit}} of the model at {where}")
            for m in NOT_WORSE
            if m in recorded
        ]
    return checks, notes


def run(ctx: RunContext) -> None:
    """Check, record the verdict, say it on stderr; any failed check fails the run before the push."""
    assert ctx.spec.output.gates is not None
    checks, notes = check(ctx.spec.output.gates, stage_metrics(ctx, Stage.DPO), ctx.read_json(ctx.layout.target))
    failed = [c["message"] for c in checks if not c["passed"]]
    ctx.write_json(ctx.layout.gates_result, {"passed": not failed, "checks": checks, "notes": notes})
    for line in [*(f"gate passed: {c['message']}" for c in checks if c["passed"]), *(f"note: {n}" for n in notes)]:
        print(f"dpo-trainer: {line}", file=sys.stderr, flush=True)
    if failed:
        pushed = "not pushed; " if ctx.spec.output.hub else ""
        raise QualityGateFailed(f"{'; '.join(failed)} ({pushed}the merged model is in {ctx.model_directory})")
