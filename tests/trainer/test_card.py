"""The model card's Hub front matter, metrics table and spec section, without training anything."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from dpo_trainer.card import metrics_table, plot_training_curves, recorded_run, render_card
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.layout import CARD_FILE, PLOT_FILE, RunLayout
from dpo_trainer.progress import Reporter
from dpojob_api.spec import DPOJob, DPOJobSpec, model_identity

from .conftest import CliRun


def _context(tmp_path: Path, spec: DPOJobSpec, token: str | None = None, **run: object) -> RunContext:
    given = spec.model_dump(mode="json", by_alias=True)
    layout = RunLayout(tmp_path)
    return RunContext(
        spec,
        layout,
        Reporter(io.StringIO()),
        token,
        RunState(layout.state),
        {"name": "llama2-se", "given_spec": given, **run},
    )


def test_front_matter_for_the_seed_recipe(tmp_path: Path) -> None:
    spec = DPOJobSpec.model_validate(
        {"output": {"hub": {"repoId": "me/llama-dpo", "commitMessage": "push with tok-0123456789"}}}
    )
    card = render_card(_context(tmp_path, spec, "tok-0123456789"), {"loss": 0.5, "rewards/margins": 0.25}, {})
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {
        "base_model": "meta-llama/Llama-2-7b-hf",
        "base_model_relation": "finetune",
        "datasets": ["lvwerra/stack-exchange-paired"],
        "library_name": "transformers",
        "tags": ["trl", "dpo", "peft", "dpo-operator", "sft", "qlora"],
        "dpo_operator": {},
    }
    assert body.startswith("\n# llama2-se\n")
    assert "| rewards/margins | 0.25 |  |" in body and "## SFT results" not in body
    assert "tok-0123456789" not in card and "push with ***" in card
    spec_section = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert spec_section["dpo"]["beta"] == 0.1 and spec_section["output"]["hub"]["repoId"] == "me/llama-dpo"
    assert not {"runtime", "suspend", "checkpointing", "reporting", "hubTokenSecretRef"} & set(spec_section)


EVAL = {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4, "eval_runtime": 2.0}


def test_card_records_the_run_and_its_eval_metrics_for_the_next_one(tmp_path: Path) -> None:
    """model-index (written and parsed by huggingface_hub) holds the eval metrics; dpo_operator the run."""
    spec = DPOJobSpec.model_validate({"output": {"hub": {"repoId": "me/llama-dpo"}}})
    card = render_card(_context(tmp_path, spec, generation=3, spec_hash="0123abcd"), {"loss": 0.5, **EVAL}, {})
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert front["dpo_operator"] == {"generation": 3, "spec_hash": "0123abcd"}
    [index] = front["model-index"]
    assert index["name"] == "me/llama-dpo"
    [result] = index["results"]
    assert result["dataset"] == {
        "name": "lvwerra/stack-exchange-paired (data/evaluation)",
        "type": "lvwerra/stack-exchange-paired",
        "split": "train",
    }
    assert {m["type"]: m["value"] for m in result["metrics"]} == {
        "loss": 0.61,
        "rewards/accuracies": 0.75,
        "rewards/margins": 0.4,
    }
    assert "Run: DPOJob `llama2-se`, generation 3, spec hash `0123abcd`." in card
    assert recorded_run(card) == {
        "generation": 3,
        "specHash": "0123abcd",
        "metrics": {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.4},
    }


def test_only_cards_written_by_dpo_operator_are_compared() -> None:
    other = "---\nmodel-index:\n- name: m\n  results:\n  - task: {type: text-generation}\n"
    other += "    dataset: {name: d, type: d}\n    metrics: [{type: rewards/accuracies, value: 0.9}]\n---\n# m\n"
    assert recorded_run(other) == {}
    assert recorded_run("# just a README\n") == {}
    assert recorded_run("---\n: [unbalanced\n---\n") == {}
    assert recorded_run("---\ndpo_operator: {}\n---\n") == {"generation": None, "specHash": None, "metrics": {}}


def test_card_compares_with_the_model_at_the_target_revision(tmp_path: Path) -> None:
    spec = DPOJobSpec.model_validate({"output": {"hub": {"repoId": "me/llama-dpo", "revision": "prod"}}})
    target = {
        "repoId": "me/llama-dpo",
        "revision": "prod",
        "commitSha": "f" * 40,
        "card": True,
        "generation": 2,
        "metrics": {"eval_rewards/accuracies": 0.7, "eval_rewards/chosen": 0.1},
    }
    card = render_card(_context(tmp_path, spec, generation=3), EVAL, {}, target)
    section = card.split("## Compared with `prod` before this push\n\n", 1)[1].split("\n\n## ", 1)[0]
    assert section.splitlines() == [
        f"`me/llama-dpo` at `prod` (commit `{'f' * 12}`, generation 2), final DPO evaluation:",
        "",
        "| metric | this run | prod before |",
        "|---|---|---|",
        "| eval loss | 0.61 |  |",
        "| eval rewards/accuracies | 0.75 | 0.7 |",
        "| eval rewards/chosen |  | 0.1 |",
        "| eval rewards/margins | 0.4 |  |",
    ]
    no_metrics = render_card(_context(tmp_path, spec), EVAL, {}, {**target, "metrics": {}})
    assert "## Compared with" not in no_metrics


def test_metrics_table_pairs_train_with_eval_and_leads_with_rewards() -> None:
    table = metrics_table(
        {"loss": 0.5, "eval_loss": 0.55, "rewards/margins": 1.0, "eval_runtime": 2.0, "epoch": 1.0, "step": 3}
    )
    assert table.splitlines() == [
        "| metric | train | eval |",
        "|---|---|---|",
        "| rewards/margins | 1 |  |",
        "| loss | 0.5 | 0.55 |",
        "| epoch | 1 |  |",
        "| step | 3 |  |",
    ]


def test_plot_is_a_png_even_without_eval(tmp_path: Path) -> None:
    history = [{"step": s, "rewards/margins": s / 10, "rewards/accuracies": 0.5 + s / 20} for s in (1, 2, 3)]
    plot_training_curves(history, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_model_card_holds_front_matter_metrics_plot_and_spec(quickstart_run: CliRun) -> None:
    model = quickstart_run.layout.model
    card = (model / CARD_FILE).read_text()
    _, front_text, body = card.split("---\n", 2)
    front = yaml.safe_load(front_text)
    assert front["library_name"] == "transformers"
    assert {"trl", "dpo"} <= set(front["tags"])
    margins = quickstart_run.summary()["metrics"]["rewards/margins"]
    assert f"| rewards/margins | {margins:.4g} |" in body
    assert f"]({PLOT_FILE})" in body
    png = (model / PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    spec_yaml = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    written = yaml.safe_load((quickstart_run.out_dir.parent / "quickstart.yaml").read_text())
    full = DPOJob.model_validate(written).spec.model_dump(mode="json", by_alias=True)
    assert yaml.safe_load(spec_yaml) == model_identity(full)  # the spec less what does not shape the model


def test_gpu_memory_gets_a_table_of_its_own(tmp_path: Path) -> None:
    """On CUDA the card lists each stage's GPU memory; the gpu/* metrics stay out of the results table."""
    spec = DPOJobSpec.model_validate({"output": {"directory": "/o"}})
    dpo = {"loss": 0.5, "gpu/peak_allocated_gib": 9.0}
    gpu = {
        "sft": {"allocated_at_start_gib": 0.0, "peak_allocated_gib": 6.25, "peak_reserved_gib": 7.0},
        "dpo": {"allocated_at_start_gib": 0.002, "peak_allocated_gib": 9.0, "peak_reserved_gib": 10.5},
    }
    card = render_card(_context(tmp_path, spec), dpo, {}, gpu_memory=gpu)
    assert "## GPU memory" in card and "| sft | 0 | 6.25 | 7 |\n| dpo | 0.002 | 9 | 10.5 |" in card
    assert "| gpu/" not in card
    assert "## GPU memory" not in render_card(_context(tmp_path, spec), {"loss": 0.5}, {})
