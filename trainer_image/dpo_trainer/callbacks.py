"""Trainer callbacks: progress events for the operator, and a test hook that simulates preemption."""

from __future__ import annotations

import os
import signal
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dpo_trainer.context import RunContext
from dpo_trainer.progress import Reporter

TEST_KILL_ENV = "DPO_TRAINER_TEST_KILL_AT"
"""Test hook, `<stage>:<step>[:<rank>]`: SIGKILL the process (only that rank's, when given) right after that
optimizer step: simulates preemption, or one worker of several dying."""


class ProgressCallback(TrainerCallback):
    """Turns every Trainer log (train, eval, final summary) into one `log` progress event."""

    def __init__(self, reporter: Reporter, stage: str) -> None:
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
                "log",
                stage=self.stage,
                step=state.global_step,
                totalSteps=state.max_steps,
                epoch=state.epoch,
                metrics=dict(logs),
            )


class KillAtStep(TrainerCallback):
    """See TEST_KILL_ENV: dies without any cleanup, like a node loss, to prove resume works."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def callbacks(ctx: RunContext, stage: str) -> list[TrainerCallback]:
    result: list[TrainerCallback] = [ProgressCallback(ctx.reporter, stage)]
    target, _, at = os.environ.get(TEST_KILL_ENV, "").partition(":")
    step, _, rank = at.partition(":")
    if target == stage and step.isdigit() and rank in ("", os.environ.get("RANK", "0")):
        result.append(KillAtStep(int(step)))
    return result
