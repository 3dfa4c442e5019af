"""The training stages: final metrics, checkpoint choice, and the adapters the shared quickstart run trained."""

from __future__ import annotations

from pathlib import Path

from dpo_trainer.training import final_metrics, latest_checkpoint

from .conftest import CliRun


def test_final_metrics_take_the_last_train_and_eval_logs() -> None:
    history = [
        {"loss": 0.69, "rewards/margins": 0.0, "step": 5, "epoch": 0.1},
        {"eval_loss": 0.68, "eval_rewards/margins": 0.01, "step": 5},
        {"loss": 0.5, "rewards/margins": 0.4, "step": 10, "epoch": 0.2},
        {"eval_loss": 0.45, "eval_rewards/margins": 0.5, "step": 10},
        {"train_runtime": 3.0, "train_loss": 0.6, "step": 10},
    ]
    assert final_metrics(history) == {
        "loss": 0.5,
        "rewards/margins": 0.4,
        "epoch": 0.2,
        "eval_loss": 0.45,
        "eval_rewards/margins": 0.5,
        "train_loss": 0.6,
    }
    assert final_metrics([]) == {}


def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (2, 4, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12" / "checkpoint-is-incomplete.txt").write_text("JIT save interrupted")
    (tmp_path / "checkpoint-14").mkdir()  # killed before trainer_state.json was written
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_the_adapters_were_trained_in_fp32(quickstart_run: CliRun) -> None:
    """As in the seed, whatever TRL does with a quantized model's adapter weights (it casts them to bf16)."""
    from safetensors import safe_open

    for stage in ("sft", "dpo"):
        with safe_open(quickstart_run.layout.adapter(stage) / "adapter_model.safetensors", "pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}, stage  # noqa: SIM118
