"""Quality gates before the push, and the revision each run pushes to, against the local Hub.

The end-to-end runs are one history of retraining pushed to one repo, shared by the tests below. They reuse the
quickstart's trained work directory (copied): only a deliberately weak model's 2 DPO steps train again; every
other run merges, writes the card, checks the gates and pushes, or just the last three.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from dpo_dev.hub import LocalHub
from dpo_trainer.card import recorded_run
from dpo_trainer.gates import check
from dpo_trainer.layout import CARD_FILE
from dpojob_api.spec import QualityGates, spec_hash

from .conftest import HUB_TOKEN, HUB_USER, CliRun, assert_failed, hub_env, quickstart_job, run_cli

METRICS = {"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4, "eval_loss": 0.6}


def test_thresholds_say_their_numbers() -> None:
    gates = QualityGates(min_eval_reward_accuracy=0.8, min_eval_reward_margin=0.4, max_eval_loss=0.5)
    checks, notes = check(gates, METRICS, None)
    assert [(c["gate"], c["passed"], c["message"]) for c in checks] == [
        ("minEvalRewardAccuracy", False, "eval rewards/accuracies 0.75 < minEvalRewardAccuracy 0.8"),
        ("minEvalRewardMargin", True, "eval rewards/margins 0.4 >= minEvalRewardMargin 0.4"),
        ("maxEvalLoss", False, "eval loss 0.6 > maxEvalLoss 0.5"),
    ]
    assert notes == []
    [close] = check(QualityGates(min_eval_reward_accuracy=0.6), {"eval_rewards/accuracies": 0.59999}, None)[0]
    assert close["message"] == "eval rewards/accuracies 0.59999 < minEvalRewardAccuracy 0.6"
    [missing] = check(QualityGates(max_eval_loss=1.0), {}, None)[0]
    assert (
        not missing["passed"]
        and missing["message"] == "maxEvalLoss: eval loss is missing from the final DPO evaluation"
    )


def _target(**fields: Any) -> dict[str, Any]:
    return {"repoId": "me/m", "revision": "main", "commitSha": "c" * 40, "card": True, **fields}


@pytest.mark.parametrize(
    ("target", "note"),
    [
        (_target(commitSha=None, card=False), "notWorseThanTarget: nothing at me/m@main yet: passed"),
        (_target(card=False), "notWorseThanTarget: me/m@main has no model card: passed"),
        (_target(metrics={}), "notWorseThanTarget: the model card at me/m@main records no eval rewards: passed"),
    ],
)
def test_not_worse_than_nothing_passes_with_a_note(target: dict[str, Any], note: str) -> None:
    assert check(QualityGates(not_worse_than_target=True), METRICS, target) == ([], [note])


def test_not_worse_than_target_compares_accuracies_and_margins() -> None:
    target = _target(metrics={"eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.5, "eval_loss": 0.1})
    checks, notes = check(QualityGates(not_worse_than_target=True), METRICS, target)
    assert [(c["passed"], c["message"]) for c in checks] == [
        (True, "eval rewards/accuracies 0.75 >= 0.75 of the model at me/m@main"),
        (False, "eval rewards/margins 0.4 < 0.5 of the model at me/m@main"),
    ]
    assert notes == []


REPO_ID = f"{HUB_USER}/retrained-dpo"
NOT_WORSE = {"notWorseThanTarget": True}
WEAK_DPO = {"maxSteps": 2, "warmupSteps": 0}


def gated_job(generation: int, dpo: dict[str, Any] | None = None, **output: Any) -> dict[str, Any]:
    """The quickstart pushing to REPO_ID as the given run generation (what the operator's ConfigMap says)."""
    hub = {"repoId": REPO_ID, **output.pop("hub", {})}
    job = quickstart_job(output={"directory": None, "hub": hub, **output}, **({"dpo": dpo} if dpo else {}))
    job["metadata"]["generation"] = generation
    return job


@dataclass
class Step:
    """One run of the history and what the Hub held right after it (later runs overwrite its files)."""

    job: dict[str, Any]
    run: CliRun
    summary: dict[str, Any] | None
    tags: dict[str, str]
    branches: dict[str, str]

    @property
    def rerun(self) -> list[str]:
        """Stages that ran (rather than being skipped as finished) and finished."""
        return [stage for stage, end in self.run.stage_ends().items() if not end["skipped"]]


@pytest.fixture(scope="module")
def history(quickstart_run: CliRun, hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Step]:
    """weak (gen 1: 2 DPO steps, nothing to compare with) → gated (gen 2: the quickstart's model, a margin gate
    fails) → good (gen 2 again, the gate relaxed: beats weak) → weak again (gen 3: worse than good) → branch (gen 4:
    the quickstart's model on a branch of its own)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    tmp = tmp_path_factory.mktemp("gates")
    for name in ("weak", "good"):
        shutil.copytree(quickstart_run.out_dir, tmp / f"{name}-out")
    again = {"commitMessage": "the weak model again"}
    runs = {
        "weak": ("weak", gated_job(1, WEAK_DPO, gates=NOT_WORSE)),
        "gated": ("good", gated_job(2, gates={**NOT_WORSE, "minEvalRewardAccuracy": 0.5, "minEvalRewardMargin": 100})),
        "good": ("good", gated_job(2, gates={**NOT_WORSE, "minEvalRewardAccuracy": 0.5, "maxEvalLoss": 5})),
        "weak again": ("weak", gated_job(3, WEAK_DPO, gates=NOT_WORSE, hub=again)),
        "branch": ("good", gated_job(4, gates=NOT_WORSE, hub={"runRevision": "branch", "commitMessage": "candidate"})),
    }
    steps = {}
    for step, (name, job) in runs.items():
        run = run_cli(job, tmp, name, env=hub_env(hub))
        run = replace(run, termination_path=shutil.copy(run.termination_path, tmp / f"step {step}.json"))
        summary = run.summary() if run.returncode == 0 else None
        refs = api.list_repo_refs(REPO_ID) if api.repo_exists(REPO_ID) else None
        tags = {t.name: t.target_commit for t in refs.tags} if refs else {}
        branches = {b.name: b.target_commit for b in refs.branches} if refs else {}
        steps[step] = Step(job, run, summary, tags, branches)
    return steps


def test_not_worse_than_nothing_passes_and_the_commit_is_tagged_with_the_run(history: dict[str, Step]) -> None:
    weak = history["weak"]
    assert weak.run.returncode == 0, weak.run.stderr[-3000:]
    assert weak.rerun == ["dpo_data", "dpo", "dpo_merge", "model_card", "gates", "push"]
    assert f"dpo-trainer: note: notWorseThanTarget: nothing at {REPO_ID}@main yet: passed" in weak.run.stderr
    model = weak.run.termination["model"]
    assert model == weak.summary["model"] and model["revision"] == "main" and model["tag"] == "run-g1"
    assert model["commitUrl"].endswith(f"/{REPO_ID}/commit/{model['commitSha']}")
    assert weak.tags == {"run-g1": model["commitSha"]} and weak.branches == {"main": model["commitSha"]}


def test_a_failed_gate_pushes_nothing_and_keeps_the_merged_model(history: dict[str, Step]) -> None:
    gated, weak = history["gated"], history["weak"]
    line = assert_failed(gated.run, "QualityGateFailed", "< minEvalRewardMargin 100", "not pushed")
    margin = history["good"].summary["metrics"]["eval_rewards/margins"]  # the same model, passed once relaxed
    expected = f"eval rewards/margins {margin:.4g} < minEvalRewardMargin 100 (not pushed; the merged model is in "
    assert gated.run.termination["message"] == expected + f"{gated.run.layout.model})"
    assert gated.run.returncode == 9 and line.endswith(gated.run.termination["message"])
    assert "dpo-trainer: gate passed: eval rewards/accuracies " in gated.run.stderr
    assert gated.rerun == ["dpo_merge", "model_card"], "no training; gates failed"
    assert "push" not in [e.get("stage") for e in gated.run.events]
    assert (gated.tags, gated.branches) == (weak.tags, weak.branches)
    assert (gated.run.layout.model / "model.safetensors").is_file()


def test_a_passed_gate_pushes_and_the_card_records_the_run_and_the_model_it_beat(
    history: dict[str, Step], hub: LocalHub
) -> None:
    from huggingface_hub import HfApi

    weak, good = history["weak"], history["good"]
    assert good.run.returncode == 0, good.run.stderr[-3000:]
    assert good.rerun == ["model_card", "gates", "push"]
    model = good.run.termination["model"]
    assert good.tags == {"run-g1": weak.run.termination["model"]["commitSha"], "run-g2": model["commitSha"]}
    assert good.branches == {"main": model["commitSha"]}
    weak_metrics, metrics = weak.summary["metrics"], good.summary["metrics"]
    assert metrics["eval_rewards/margins"] > weak_metrics["eval_rewards/margins"]
    gates = good.summary["gates"]
    assert gates["passed"] and gates["notes"] == []
    assert [(c["gate"], c["metric"], c["limit"]) for c in gates["checks"]] == [
        ("minEvalRewardAccuracy", "eval_rewards/accuracies", 0.5),
        ("maxEvalLoss", "eval_loss", 5),
        ("notWorseThanTarget", "eval_rewards/accuracies", pytest.approx(weak_metrics["eval_rewards/accuracies"])),
        ("notWorseThanTarget", "eval_rewards/margins", pytest.approx(weak_metrics["eval_rewards/margins"])),
    ]

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    card = Path(api.hf_hub_download(REPO_ID, CARD_FILE, revision="run-g2")).read_text()
    recorded = recorded_run(card)
    assert recorded["generation"] == 2 and recorded["specHash"] == spec_hash(good.job["spec"])
    assert recorded["metrics"]["eval_rewards/margins"] == pytest.approx(metrics["eval_rewards/margins"])
    weak_commit = weak.run.termination["model"]["commitSha"]
    assert f"`{REPO_ID}` at `main` (commit `{weak_commit[:12]}`, generation 1), final DPO evaluation:" in card
    margins = (metrics["eval_rewards/margins"], weak_metrics["eval_rewards/margins"])
    assert "| eval rewards/margins | {:.4g} | {:.4g} |".format(*margins) in card


def test_not_worse_than_target_fails_against_a_better_model(history: dict[str, Step]) -> None:
    again, good = history["weak again"], history["good"]
    assert again.rerun == ["model_card"]
    assert_failed(again.run, "QualityGateFailed", f"of the model at {REPO_ID}@main (not pushed; ")
    worse, better = (s.summary["metrics"]["eval_rewards/margins"] for s in (history["weak"], good))
    assert f"eval rewards/margins {worse:.4g} < {better:.4g} of the model at" in again.run.termination["message"]
    assert (again.tags, again.branches) == (good.tags, good.branches)


def test_a_branch_per_run_leaves_the_target_revision_alone(history: dict[str, Step], hub: LocalHub) -> None:
    from huggingface_hub import HfApi

    branch, good = history["branch"], history["good"]
    assert branch.run.returncode == 0, branch.run.stderr[-3000:]
    model = branch.run.termination["model"]
    assert model["revision"] == "run-g4" and "tag" not in model
    assert branch.tags == good.tags
    assert branch.branches == {**good.branches, "run-g4": model["commitSha"]}
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    commits = [c.commit_id for c in api.list_repo_commits(REPO_ID, revision="run-g4")]
    assert commits[:2] == [model["commitSha"], good.run.termination["model"]["commitSha"]]
