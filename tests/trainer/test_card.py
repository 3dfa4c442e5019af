"""The model card's Hub front matter, metrics table and spec section, without training anything."""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from dpo_operator.spec import DPOJob, DPOJobSpec, model_identity
from dpo_trainer.card import metrics_table, plot_training_curves, render_card
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.progress import Reporter

from .conftest import CliRun


def _context(tmp_path: Path, spec: DPOJobSpec, token: str | None = None) -> RunContext:
    given = spec.model_dump(mode="json", by_alias=True)
    return RunContext(
        spec,
        tmp_path,
        Reporter(io.StringIO()),
        token,
        RunState(tmp_path / "state.json"),
        {"name": "llama2-se", "given_spec": given},
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
    }
    assert body.startswith("\n# llama2-se\n")
    assert "| rewards/margins | 0.25 |  |" in body and "## SFT results" not in body
    assert "tok-0123456789" not in card and "push with ***" in card
    spec_section = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert spec_section["dpo"]["beta"] == 0.1 and spec_section["output"]["hub"]["repoId"] == "me/llama-dpo"
    assert not {"runtime", "suspend", "checkpointing", "reporting", "hubTokenSecretRef"} & set(spec_section)


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
    card = (quickstart_run.out_dir / "model" / "README.md").read_text()
    _, front_text, body = card.split("---\n", 2)
    front = yaml.safe_load(front_text)
    assert front["library_name"] == "transformers"
    assert {"trl", "dpo"} <= set(front["tags"])
    margins = quickstart_run.summary()["metrics"]["rewards/margins"]
    assert f"| rewards/margins | {margins:.4g} |" in body
    assert "](training_curves.png)" in body
    png = (quickstart_run.out_dir / "model" / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    spec_yaml = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    written = yaml.safe_load((quickstart_run.out_dir.parent / "quickstart.yaml").read_text())
    full = DPOJob.model_validate(written).spec.model_dump(mode="json", by_alias=True)
    assert yaml.safe_load(spec_yaml) == model_identity(full)  # the spec less what does not shape the model
