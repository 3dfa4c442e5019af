"""The trainer → operator contract: progress lines on stdout and the JSON termination message.

The operator's only view into a trainer pod is its log and its termination message. Every progress line is
one JSON object:

    {"kind": "dpo-trainer/progress", "event": <event>, "time": <unix seconds, float>, ...fields}

    stage_start  {"stage"}
    log          {"stage", "step", "totalSteps", "epoch", "metrics": {every key the Trainer logged}}
    stage_end    {"stage", "seconds", "skipped"}
    done         {"summary": {"metrics"}}
    error        {"reason", "message"}

The trainer writes these; the operator validates each one with ProgressEvent, because pod output is untrusted
input: anything running in the pod can print such a line.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROGRESS_KIND = "dpo-trainer/progress"
EventKind = Literal["stage_start", "log", "stage_end", "done", "error"]
TrainerStage = Literal["data", "sft", "sft_merge", "dpo_data", "dpo", "dpo_merge", "model_card", "gates", "push"]
TRAINER_STAGES: tuple[str, ...] = get_args(TrainerStage)
Reason = Literal[
    "Succeeded",
    "InvalidSpec",
    "DatasetError",
    "ModelLoadError",
    "HubAuthError",
    "HubError",
    "OutOfMemory",
    "TrainingError",
    "QualityGateFailed",
    "GPUUnavailable",
    "Interrupted",
]
"""The reason in a termination message (and an `error` event); the trainer's exit code maps to the same."""

TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_PATH_ENV = "DPO_TERMINATION_MESSAGE_PATH"
"""The trainer writes its termination message where this env var says (the pod spec sets it)."""
TERMINATION_MESSAGE_LIMIT = 4096
"""Kubernetes truncates a termination message at 4 KiB."""

DISPLAY_STAGE: dict[str, str] = {
    "data": "data",
    "sft": "sft",
    "sft_merge": "merge",
    "dpo_data": "data",
    "dpo": "dpo",
    "dpo_merge": "merge",
    "model_card": "push",
    "gates": "push",
    "push": "push",
}
"""Trainer stage -> the stage users see in status.stage."""
STAGE_WEIGHTS: dict[str, int] = {
    "data": 1,
    "sft": 40,
    "sft_merge": 3,
    "dpo_data": 1,
    "dpo": 50,
    "dpo_merge": 3,
    "model_card": 1,
    "gates": 1,
    "push": 1,
}
"""Share of the whole run each trainer stage covers, for status.progress.percent (training dominates)."""
REWARD_KEYS: dict[str, str] = {
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
    "rewards/accuracies": "accuracies",
    "rewards/margins": "margins",
}
"""DPO's reward metrics -> status.rewards fields."""

MAX_METRICS = 64
"""Metric keys kept per event: the Trainer logs about 20; status must stay far below the object size limit."""
_METRIC_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_MAX_STEP = 10**9
MAX_CLOCK_SKEW_S = 300.0
"""An event time further ahead of the reader's clock than this is not believed (it would freeze replays)."""


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def bounded_metrics(value: Any) -> dict[str, float]:
    """Finite numbers under plausible keys, at most MAX_METRICS (rewards and loss first); others dropped."""
    if not isinstance(value, dict):
        raise ValueError("metrics must be an object")
    kept = {key: float(number) for key, number in value.items() if _METRIC_KEY.fullmatch(key) and finite(number)}
    ranked = sorted(kept, key=lambda key: (key not in REWARD_KEYS and key != "loss", key))
    return {key: kept[key] for key in ranked[:MAX_METRICS]}


class ProgressEvent(BaseModel):
    """One progress line as the operator accepts it."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["dpo-trainer/progress"]
    event: EventKind
    time: float | None = Field(None, ge=0)
    stage: str | None = Field(None, max_length=64)
    step: int = Field(0, ge=0, le=_MAX_STEP)
    totalSteps: int = Field(0, ge=0, le=_MAX_STEP)
    skipped: bool = False
    metrics: dict[str, float] = Field(default_factory=dict)
    summary_metrics: dict[str, float] = Field(default_factory=dict)

    @field_validator("time")
    @classmethod
    def _not_in_the_future(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value <= time.time() + MAX_CLOCK_SKEW_S):
            raise ValueError("time must be a Unix time no later than now")
        return value

    @field_validator("step", "totalSteps", mode="before")
    @classmethod
    def _null_is_zero(cls, value: Any) -> Any:
        return 0 if value is None else value

    @field_validator("metrics", "summary_metrics", mode="before")
    @classmethod
    def _bounded_metrics(cls, value: Any) -> dict[str, float]:
        return bounded_metrics({} if value is None else value)
