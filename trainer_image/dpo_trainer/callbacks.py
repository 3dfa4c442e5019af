"""Trainer callbacks: progress events for the operator, and the stage's stop rules.

Stop rules (spec.sft/dpo.stopRules, plus the built-in ones unless builtinStopRules is false) are checked at every
log, on every process alike (the logged values are gathered across processes), so all of them stop together.
`fail` and `finish` stop training at that step with a checkpoint saved; train_and_save then fails the run
(StoppedByRule, Diverged) or carries on to save the adapter (finish). `warn` only reports.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dpo_trainer.context import RunContext
from dpo_trainer.layout import TrainingStage
from dpo_trainer.progress import Reporter, to_json_safe
from dpojob_api.progress import RuleFired, StageLog
from dpojob_api.spec import RuleAction, StopRule
from dpojob_api.vocabulary import Reason, Stage

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
DISPLACEMENT_WINDOW = 5
"""Consecutive DPO train logs over which chosen and rejected log-probabilities must both fall (and the margin
grow) for the built-in likelihood-displacement warning."""
DIVERGED_RULE = "diverged"
DISPLACEMENT_RULE = "likelihood-displacement"


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


@dataclass(frozen=True)
class Firing:
    """A rule that fired: what the stage does next, and why."""

    rule: str
    action: RuleAction
    reason: Reason
    message: str


class StopRulesCallback(TrainerCallback):
    """Checks the stage's stop rules at every log; `stop` is the fail/finish rule that fired, if any."""

    def __init__(self, reporter: Reporter, stage: TrainingStage, rules: list[StopRule], builtins: bool) -> None:
        self.reporter = reporter
        self.stage = stage
        self.rules = rules
        self.builtins = builtins
        self.streaks = {rule.name: 0 for rule in rules}
        self.warned: set[str] = set()
        self.recent: deque[tuple[float, float, float]] = deque(maxlen=DISPLACEMENT_WINDOW)
        self.stop: Firing | None = None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or self.stop is not None:
            return
        step = state.global_step
        for firing in self._check(logs, step):
            if state.is_world_process_zero:
                self.reporter.emit(RuleFired(stage=self.stage, step=step, **firing.__dict__))
            if firing.action == "warn":
                self.warned.add(firing.rule)
                continue
            self.stop = firing
            control.should_training_stop = True
            control.should_save = True  # a checkpoint of this very step: a fixed spec or a retry resumes here
            return

    def _check(self, logs: dict[str, Any], step: int) -> list[Firing]:
        firings = []
        if self.builtins:
            firings += self._builtins(logs, step)
        for rule in self.rules:
            value = logs.get(rule.metric)
            if not isinstance(value, int | float) or step < rule.after_step:
                continue
            holds = math.isfinite(value) and COMPARISONS[rule.comparison](value, rule.threshold)
            self.streaks[rule.name] = self.streaks[rule.name] + 1 if holds else 0
            if self.streaks[rule.name] >= rule.for_logs and rule.name not in self.warned:
                firings.append(self._firing(rule, value, step))
        return firings

    def _firing(self, rule: StopRule, value: float, step: int) -> Firing:
        condition = f"{rule.metric} {rule.comparison} {rule.threshold:g}"
        streak = f" for {rule.for_logs} logs" if rule.for_logs > 1 else ""
        after = f" from step {rule.after_step}" if rule.after_step else ""
        seen = f"stop rule {rule.name}: {condition}{streak}{after} (at step {step}: {value:.4g})"
        if rule.action == "fail":
            outcome = "training stopped with a checkpoint; nothing merged or pushed"
            return Firing(rule.name, rule.action, Reason.STOPPED_BY_RULE, f"{self.stage}: {seen}: {outcome}")
        if rule.action == "finish":
            outcome = "training finished early; the model is merged and pushed as trained so far"
            return Firing(rule.name, rule.action, Reason.STOPPED_BY_RULE, f"{self.stage}: {seen}: {outcome}")
        return Firing(rule.name, rule.action, Reason.METRIC_RULE, f"{self.stage}: {seen}")

    def _builtins(self, logs: dict[str, Any], step: int) -> list[Firing]:
        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, int | float) and not math.isfinite(value):
                message = (
                    f"{self.stage}: {key} is {value} at step {step}: training diverged and stopped, nothing pushed; "
                    f"lower spec.{self.stage}.learningRate, raise warmupSteps, or check the data"
                )
                return [Firing(DIVERGED_RULE, "fail", Reason.DIVERGED, message)]
        if self.stage != Stage.DPO or DISPLACEMENT_RULE in self.warned:
            return []
        values = [logs.get(key) for key in ("logps/chosen", "logps/rejected", "rewards/margins")]
        numbers = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
        if len(numbers) != len(values):
            return []
        chosen, rejected, margin = numbers
        self.recent.append((chosen, rejected, margin))
        if len(self.recent) < DISPLACEMENT_WINDOW:
            return []
        window = list(self.recent)
        falling = all(later[i] < earlier[i] for earlier, later in itertools.pairwise(window) for i in (0, 1))
        if not (falling and window[-1][2] > window[0][2]):
            return []
        message = (
            f"{self.stage}: likelihood displacement: logps/chosen {window[0][0]:.4g} → {chosen:.4g} and "
            f"logps/rejected {window[0][1]:.4g} → {rejected:.4g} both fell over {DISPLACEMENT_WINDOW} logs while "
            f"rewards/margins rose to {margin:.4g} (step {step}): the chosen answers become less likely too; "
            "consider a lower learningRate, a higher beta, or lossType [sigmoid, sft]"
        )
        return [Firing(DISPLACEMENT_RULE, "warn", Reason.LIKELIHOOD_DISPLACEMENT, message)]


def stop_rules(trainer_callbacks: list[TrainerCallback]) -> StopRulesCallback | None:
    """The stage's StopRulesCallback among a Trainer's callbacks."""
    return next((c for c in trainer_callbacks if isinstance(c, StopRulesCallback)), None)


def callbacks(ctx: RunContext, stage: TrainingStage) -> list[TrainerCallback]:
    """The callbacks every training stage's Trainer gets."""
    section = ctx.spec.sft if stage == Stage.SFT else ctx.spec.dpo
    return [
        ProgressCallback(ctx.reporter, stage),
        StopRulesCallback(ctx.reporter, stage, section.stop_rules, section.builtin_stop_rules),
    ]
