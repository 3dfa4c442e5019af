"""Trainer callbacks: progress events for the operator."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dpo_trainer.context import RunContext
from dpo_trainer.layout import TrainingStage
from dpo_trainer.progress import Reporter, to_json_safe
from dpojob_api.progress import StageLog


class ProgressCallback(TrainerCallback):
    """Turns every Trainer log (train, eval, final summary) into one `log` progress event."""

    def __init__(self, reporter: Reporter, stage: TrainingStage) -> None:
        self.reporter = reporter
        self.stage = stage

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero and logs:
            self.reporter.emit(
                StageLog(
                    stage=self.stage,
                    step=state.global_step,
                    totalSteps=state.max_steps,
                    epoch=state.epoch,
                    metrics=to_json_safe(dict(logs)),
                )
            )


def callbacks(ctx: RunContext, stage: TrainingStage) -> list[TrainerCallback]:
    """The callbacks every training stage's Trainer gets."""
    return [ProgressCallback(ctx.reporter, stage)]
