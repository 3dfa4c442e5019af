"""The DPOJob status schema: declared in the CRD (so patches are not pruned) and produced by the operator."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
Stage = Literal["data", "sft", "merge", "dpo", "push"]
ConditionType = Literal["Ready", "Running", "Succeeded", "Failed", "Suspended"]


class StatusModel(BaseModel):
    """Base of status objects: camelCase; fields written by other operator versions are kept (extra="allow"), so a
    status read, recomputed and written back loses none of them; assignments are validated, so the operator
    cannot build a status the CRD would refuse."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="allow",
        validate_assignment=True,
    )


class Condition(StatusModel):
    """A Kubernetes-style condition (kstatus / Flux / Argo CD read these)."""

    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str
    """CamelCase reason, e.g. Running, Succeeded, OutOfMemory, Unschedulable, InvalidSpec."""
    message: str = ""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = None
    """metadata.generation this condition was computed for."""


class Progress(StatusModel):
    """Where training is within the current stage."""

    step: int = 0
    """Optimizer step within the stage."""
    total_steps: int = 0
    """Steps the stage will run."""
    percent: int = 0
    """Progress of the whole run (SFT then DPO), 0-100."""
    eta_seconds: int | None = None
    """Estimated seconds until the current stage finishes."""
    updated_at: str | None = None
    """When the trainer last reported (RFC 3339)."""


class Rewards(StatusModel):
    """The latest DPO reward metrics (train; eval ones are in metrics with an eval_ prefix)."""

    chosen: float | None = None
    rejected: float | None = None
    accuracies: float | None = None
    margins: float | None = None


class ModelLocation(StatusModel):
    """Where the merged model went."""

    directory: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    """Branch the commit was pushed to."""
    tag: str | None = None
    """The run's tag on that commit (output.hub.runRevision tag), e.g. run-g3."""
    commit_url: str | None = None
    commit_sha: str | None = None


class TrainerRef(StatusModel):
    """The Kubernetes objects running the current run."""

    job_name: str | None = None
    pod_name: str | None = None
    config_map_name: str | None = None
    last_failure: str | None = Field(default=None, max_length=1024)
    """The run's latest failed trainer pod: its name, reason and message (why the Job retried or failed)."""


class RunRef(StatusModel):
    """Identity of a run: a training spec, first seen at a generation, and its attempt."""

    generation: int
    """metadata.generation at which this training spec was first seen; names the trainer Job."""
    spec_hash: str
    """Hash of what decides the model: the spec less runtime, suspend, checkpointing, reporting, token Secret."""
    attempt: int | None = None
    """Retries of a Failed run asked for with the dpo-operator.io/retry annotation (absent: the first)."""
    retry_token: str | None = None
    """The dpo-operator.io/retry value this run has seen."""


class Run(RunRef):
    """A finished or superseded run, kept for the retraining history."""

    phase: Phase = "Pending"
    reason: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    rewards: Rewards | None = None
    metrics: dict[str, float] | None = None
    model: ModelLocation | None = None
    retries: int = 0


class DPOJobStatus(StatusModel):
    """Observed state of a DPOJob."""

    observed_generation: int | None = None
    """metadata.generation the operator last acted on."""
    phase: Phase | None = None
    stage: Stage | None = None
    """Trainer stage: data, sft, merge, dpo or push."""
    conditions: list[Condition] = Field(default_factory=list)
    start_time: str | None = None
    completion_time: str | None = None
    progress: Progress | None = None
    rewards: Rewards | None = None
    """Latest rewards/* metrics of the DPO stage."""
    metrics: dict[str, float] | None = None
    """Latest logged metrics by their TRL names (rewards/margins, loss, eval_loss, ...)."""
    model: ModelLocation | None = None
    trainer: TrainerRef | None = None
    retries: int = 0
    """Trainer pods that failed and were retried in the current run."""
    run: RunRef | None = None
    """The current run."""
    runs: list[Run] = Field(default_factory=list)
    """Previous runs, oldest first (capped)."""

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> DPOJobStatus:
        """Parse a status document such as the API server holds. A value this version cannot read (another
        version's enum value, say) is left out with its top-level field or list item rather than failing every
        reconcile of the DPOJob: the status is recomputed from the cluster anyway."""
        try:
            return cls.model_validate(document)
        except ValidationError as error:
            bad = {_holder(e["loc"]) for e in error.errors()}
        readable = {
            key: [item for i, item in enumerate(value) if (key, i) not in bad] if isinstance(value, list) else value
            for key, value in document.items()
            if (key,) not in bad
        }
        return cls.model_validate(readable)

    def to_document(self) -> dict[str, Any]:
        """The status as the API server stores it: camelCase, only the fields that were set, and no None or "" (the
        server reads "" back as null), so that comparing it with the stored status finds real changes only."""
        return _without_empty(self.model_dump(by_alias=True, exclude_unset=True))


def _holder(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Where an invalid value sits: its top-level field, or that field's list item."""
    return loc[:2] if len(loc) > 1 and isinstance(loc[1], int) else loc[:1]


def _without_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value
