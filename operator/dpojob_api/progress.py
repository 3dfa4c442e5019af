"""The trainer → operator contract: progress lines on stdout and the JSON termination message.

The operator's only view into a trainer pod is its log and its termination message. Every progress line is
one JSON object:

    {"kind": "dpo-trainer/progress", "event": <event>, "time": <unix seconds, float>, ...fields}

    stage_start  {"stage"}
    log          {"stage", "step", "totalSteps", "epoch", "metrics": {every key the Trainer logged}}
    stage_end    {"stage", "seconds", "skipped"}
    done         {"summary": {"metrics"}}
    error        {"reason", "message"}
    sft_model    {"digest", "source", "origin", "message"}   (the SFT model shared between DPOJobs)

The trainer (and the benchmarks standing in for it) write them as StageStart, StageLog, StageEnd, Done and
TrainerFailed; the operator validates each line with ProgressEvent, leniently, because pod output is untrusted
input: anything running in the pod can print such a line. The termination message, {"reason", "message",
"metrics", "model"}, is written and read through TerminationMessage for the same reason.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)
from pydantic.alias_generators import to_camel

from .status import StageCost
from .vocabulary import Stage

PROGRESS_KIND = "dpo-trainer/progress"


class _Line(BaseModel):
    """What every progress line carries; dumped by `line()` as the JSON the operator reads."""

    model_config = ConfigDict(use_enum_values=True, ser_json_inf_nan="null")

    kind: Literal["dpo-trainer/progress"] = "dpo-trainer/progress"
    time: float = Field(default_factory=time.time)

    def line(self) -> str:
        """One JSON line, starting as the operator looks for it (`{"kind": "dpo-trainer/progress"`); NaN and
        infinities as null (json.dumps would write invalid JSON)."""
        return json.dumps(self.model_dump(mode="json"), ensure_ascii=False, allow_nan=False)


class StageStart(_Line):
    event: Literal["stage_start"] = "stage_start"
    stage: Stage


class StageLog(_Line):
    """One Trainer log: every key it logged (loss, rewards/*, eval_*, learning_rate, ...)."""

    event: Literal["log"] = "log"
    stage: Stage
    step: int
    totalSteps: int
    epoch: float | None = None
    metrics: dict[str, Any]


class StageEnd(_Line):
    event: Literal["stage_end"] = "stage_end"
    stage: Stage
    seconds: float
    skipped: bool
    """Finished by an earlier run with the same inputs (seconds is then 0)."""


class Done(_Line):
    event: Literal["done"] = "done"
    summary: dict[str, Any]
    """summary.json: {"metrics", "stages", "model", ...}."""


class TrainerFailed(_Line):
    event: Literal["error"] = "error"
    reason: str
    """A vocabulary.Reason."""
    message: str


class RuleFired(_Line):
    """A stop rule (spec.sft/dpo.stopRules or a built-in one) fired."""

    event: Literal["rule"] = "rule"
    stage: Stage
    step: int
    rule: str
    """The rule's name (built-in: diverged, likelihood-displacement)."""
    action: Literal["fail", "finish", "warn"]
    reason: str
    """A vocabulary.Reason: StoppedByRule, Diverged, MetricRule, LikelihoodDisplacement."""
    message: str


class Preflight(_Line):
    """The preflight's estimate of each training stage's peak GPU memory (dpo_trainer.preflight)."""

    event: Literal["preflight"] = "preflight"
    estimates: dict[str, float]
    """GiB per training stage."""
    gpuMemoryGiB: float | None = None
    """The memory of the GPU the estimate was checked against (none on CPU)."""


SFTSource = Literal["trained", "reused", "waiting"]
"""Where a run's merged SFT model comes from (dpo_trainer.sft_cache): trained by this run (and shared), reused from
the shared cache, or not yet known while another DPOJob trains the same one."""


class SFTModel(_Line):
    """The run's SFT model, by its identity (dpo_trainer.sft_cache.sft_identity): trained here, reused, or waited
    for while another DPOJob trains it."""

    event: Literal["sft_model"] = "sft_model"
    digest: str = Field(pattern=r"^[0-9a-f]{16}$")
    source: SFTSource
    origin: str = Field(max_length=512)
    """The DPOJob (namespace/name) that trains or trained it, or the directory of a run outside Kubernetes."""
    message: str = ""


class ResolvedRepo(BaseModel):
    """A Hub repository at the commit a run started from (or a local directory)."""

    name: str = Field(max_length=256)
    revision: str | None = Field(default=None, max_length=256)
    sha: str | None = Field(default=None, max_length=64)
    local: bool = False

    def label(self) -> str:
        """name@commit (or @revision while unresolved), or the local directory's name."""
        return self.name if self.local else f"{self.name}@{self.sha or self.revision or 'main'}"


class RunProvenance(BaseModel):
    """What the model came from: the trainer writes it (summary.json "provenance"), the operator reads it."""

    model: ResolvedRepo | None = None
    datasets: list[ResolvedRepo] = Field(default_factory=list, max_length=8)
    libraries: dict[str, Annotated[str, Field(max_length=64)]] = Field(default_factory=dict, max_length=16)

    def to_status(self) -> dict[str, Any]:
        """status.provenance (camelCase)."""
        document: dict[str, Any] = {"datasets": [d.label() for d in self.datasets], "libraries": self.libraries}
        if self.model is not None:
            document["model"] = self.model.name if self.model.local else f"{self.model.name}@{self.model.revision}"
            if self.model.sha:
                document["modelSha"] = self.model.sha
        return document


ProgressLine = StageStart | StageLog | StageEnd | Done | TrainerFailed | RuleFired | Preflight | SFTModel
"""What the trainer writes."""
EventKind = Literal["stage_start", "log", "stage_end", "done", "error", "rule", "preflight", "sft_model"]
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
TERMINATION_PATH_ENV = "DPO_TERMINATION_MESSAGE_PATH"
"""The trainer writes its termination message where this env var says (the pod spec sets it)."""
SPEC_DIGEST_ENV = "DPO_SPEC_SHA256"
"""The SHA-256 (hex) of the spec file the operator wrote for the run: the trainer refuses a file that differs
(its ConfigMap replaced after the Job was created)."""
TERMINATION_MESSAGE_LIMIT = 4096
"""Kubernetes truncates a termination message at 4 KiB."""

REWARD_KEYS: dict[str, str] = {
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
    "rewards/accuracies": "accuracies",
    "rewards/margins": "margins",
}
"""DPO's reward metrics -> status.rewards fields (with the eval_ prefix: status.evalRewards)."""


def readable(value: float) -> float:
    """A metric as status shows it: four significant digits (the card and summary.json keep them all)."""
    return float(f"{value:.4g}")


def status_metrics(metrics: dict[str, float]) -> dict[str, Any]:
    """status.metrics, status.rewards and status.evalRewards (camelCase) from logged metrics, readable."""
    fields: dict[str, Any] = {"metrics": {key: readable(value) for key, value in sorted(metrics.items())}}
    for field, prefix in (("rewards", ""), ("evalRewards", "eval_")):
        found = {
            short: readable(metrics[prefix + key]) for key, short in REWARD_KEYS.items() if prefix + key in metrics
        }
        if found:
            fields[field] = found
    return fields


MAX_METRICS = 64
"""Metric keys kept per event: the Trainer logs about 20; status must stay far below the object size limit."""
_METRIC_KEY = re.compile(r"[A-Za-z0-9_./-]{1,64}")
_MAX_STEP = 10**9
MAX_RULE_MESSAGE = 1024
"""Longest rule message taken into status."""
MAX_CLOCK_SKEW_S = 300.0
"""An event time further ahead of the reader's clock than this is not believed (it would freeze replays)."""


def finite(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metric_priority(key: str) -> int:
    """Lower is kept first when metrics must be cut: rewards/* and losses matter most to users."""
    if key.startswith(("rewards/", "eval_rewards/")):
        return 0
    if key in ("loss", "eval_loss", "train_loss"):
        return 1
    return 2


def bounded_metrics(value: Any) -> dict[str, float]:
    """Finite numbers under plausible keys, at most MAX_METRICS (by metric_priority); others dropped."""
    if not isinstance(value, dict):
        raise ValueError("metrics must be an object")
    kept = {key: float(number) for key, number in value.items() if _METRIC_KEY.fullmatch(key) and finite(number)}
    ranked = sorted(kept, key=lambda key: (metric_priority(key), key))
    return {key: kept[key] for key in ranked[:MAX_METRICS]}


def _none_if_invalid(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A field of untrusted input that does not validate is dropped, not the message it came in."""
    try:
        return handler(value)
    except ValidationError:
        return None


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
    estimates: dict[str, float] = Field(default_factory=dict)
    """A preflight's GiB per training stage (sft, dpo); others dropped."""
    gpuMemoryGiB: Annotated[float | None, Field(ge=0, le=1 << 20), WrapValidator(_none_if_invalid)] = None
    summary_efficiency: dict[str, Any] = Field(default_factory=dict)
    """summary.json "efficiency", as status.efficiency has it (camelCase); empty when it does not validate."""
    summary_provenance: dict[str, Any] = Field(default_factory=dict)
    """summary.json "provenance" as status.provenance has it (RunProvenance.to_status); empty when invalid."""
    rule: Annotated[str | None, Field(pattern=r"^[a-z0-9][-a-z0-9]{0,62}$"), WrapValidator(_none_if_invalid)] = None
    action: Annotated[Literal["fail", "finish", "warn"] | None, WrapValidator(_none_if_invalid)] = None
    reason: Annotated[str | None, Field(pattern=r"^[A-Z][A-Za-z0-9]{0,63}$"), WrapValidator(_none_if_invalid)] = None
    message: str = ""
    digest: Annotated[str | None, Field(pattern=r"^[0-9a-f]{16}$"), WrapValidator(_none_if_invalid)] = None
    """An sft_model event's SFT identity."""
    source: Annotated[SFTSource | None, WrapValidator(_none_if_invalid)] = None
    origin: Annotated[
        str | None, Field(max_length=512, pattern=r"^[^\x00-\x1f\x7f]*$"), WrapValidator(_none_if_invalid)
    ] = None

    @field_validator("estimates", mode="before")
    @classmethod
    def _estimates(cls, value: Any) -> dict[str, float]:
        if not isinstance(value, dict):
            return {}
        return {k: float(v) for k, v in value.items() if k in (Stage.SFT, Stage.DPO) and finite(v) and 0 <= v < 1 << 20}

    @field_validator("summary_efficiency", mode="before")
    @classmethod
    def _efficiency(cls, value: Any) -> dict[str, Any]:
        try:
            return {
                stage: StageCost.model_validate(cost).model_dump(by_alias=True, exclude_none=True)
                for stage, cost in value.items()
                if stage in (Stage.SFT, Stage.DPO)
            }
        except (AttributeError, TypeError, ValidationError):
            return {}

    @field_validator("summary_provenance", mode="before")
    @classmethod
    def _provenance(cls, value: Any) -> dict[str, Any]:
        try:
            return RunProvenance.model_validate(value).to_status()
        except ValidationError:
            return {}

    @field_validator("message", mode="before")
    @classmethod
    def _one_bounded_line(cls, value: Any) -> str:
        return " ".join(value.split())[:MAX_RULE_MESSAGE] if isinstance(value, str) else ""

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


MAX_LOCATION_LENGTH = 1024
"""Longest string of a model location (a path, repo id, revision, tag, URL or commit SHA) taken into status."""
_Location = Annotated[
    str | None, Field(max_length=MAX_LOCATION_LENGTH, pattern=r"^[^\x00-\x1f\x7f]*$"), WrapValidator(_none_if_invalid)
]


class TrainedModel(BaseModel):
    """Where the merged model went (status.model): each field a one-line string of bounded length, or dropped."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)

    directory: _Location = None
    repo_id: _Location = None
    revision: _Location = None
    tag: _Location = None
    commit_url: _Location = None
    commit_sha: _Location = None


class TerminationMessage(BaseModel):
    """The trainer's termination message: what the trainer writes and all the operator reads of it.

    Lenient, as the operator must be with pod output: a field of the wrong type, size or shape is dropped (a
    message is cut to TERMINATION_MESSAGE_LIMIT), never the whole message, and reading never raises.
    """

    model_config = ConfigDict(extra="ignore", use_enum_values=True)

    reason: Annotated[str | None, Field(pattern=r"^[A-Z][A-Za-z0-9]{0,63}$"), WrapValidator(_none_if_invalid)] = None
    """A vocabulary.Reason; any CamelCase word is taken, so an older operator reads a newer trainer's reasons."""
    message: str = ""
    stage: Annotated[Stage | None, WrapValidator(_none_if_invalid)] = None
    """The stage a failed run stopped in (the progress stream's last word may not have been read yet)."""
    metrics: dict[str, float] = Field(default_factory=dict)
    model: Annotated[TrainedModel | None, WrapValidator(_none_if_invalid)] = None

    @classmethod
    def parse(cls, text: str | None) -> TerminationMessage:
        """A container's termination message; empty when absent, not JSON (a log tail) or not an object."""
        try:
            return cls.model_validate_json(text or "{}")
        except ValidationError:
            return cls()

    def to_document(self) -> dict[str, Any]:
        """The JSON object written to the termination-message file: set fields only, camelCase."""
        return self.model_dump(mode="json", by_alias=True, exclude_defaults=True)

    @field_validator("message", mode="before")
    @classmethod
    def _cut(cls, value: Any) -> str:
        return value[:TERMINATION_MESSAGE_LIMIT] if isinstance(value, str) else ""

    @field_validator("metrics", mode="before")
    @classmethod
    def _bounded_metrics(cls, value: Any) -> dict[str, float]:
        return bounded_metrics(value) if isinstance(value, dict) else {}
