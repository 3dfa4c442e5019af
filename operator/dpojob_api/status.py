"""The DPOJob status schema: declared in the CRD (so patches are not pruned) and produced by the operator."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from .vocabulary import Phase, Stage


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
        use_enum_values=True,
    )


MAX_CONDITION_REASON = 1024
MAX_CONDITION_MESSAGE = 32768
"""metav1.Condition's bounds."""


class Condition(StatusModel):
    """A Kubernetes-style condition (kstatus / Flux / Argo CD read these)."""

    type: str = Field(max_length=64, pattern=r"^[A-Z][A-Za-z0-9]*$")
    """A vocabulary.ConditionType (any CamelCase word is kept: another version's type)."""
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=MAX_CONDITION_REASON)
    """CamelCase reason, e.g. Running, Succeeded, OutOfMemory, Unschedulable, InvalidSpec."""
    message: str = Field(default="", max_length=MAX_CONDITION_MESSAGE)
    last_transition_time: str = Field(json_schema_extra={"format": "date-time"})
    """When status last changed (RFC 3339)."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation this condition was computed for."""


class Progress(StatusModel):
    """Where training is within the current stage."""

    step: int = 0
    """Optimizer step within the stage."""
    total_steps: int = 0
    """Steps the stage will run."""
    percent: int = 0
    """Progress of the whole run (every stage, weighted by its usual share of the time), 0-100."""
    eta_seconds: int | None = None
    """Estimated seconds until the whole run finishes (at the rate of the current training stage since this pod
    started it, so a resumed run is not taken to be faster than it is)."""
    eta: str | None = None
    """eta_seconds for people, e.g. 3h12m (the ETA column)."""
    stage_eta_seconds: int | None = None
    """Estimated seconds until the current stage finishes."""
    updated_at: str | None = None
    """When the trainer last reported (RFC 3339)."""


class Rewards(StatusModel):
    """DPO's reward metrics (rewards/* or eval_rewards/*)."""

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


class RuleHit(StatusModel):
    """A stop rule that fired in the current run (spec.sft/dpo.stopRules, or a built-in one)."""

    stage: str = Field(max_length=64)
    rule: str = Field(max_length=63)
    action: Literal["fail", "finish", "warn"]
    reason: str = Field(max_length=64)
    """StoppedByRule, Diverged, MetricRule or LikelihoodDisplacement."""
    step: int = 0
    message: str = Field(default="", max_length=1024)


MAX_RULE_HITS = 16


class StageCost(StatusModel):
    """What a training stage took (the trainer's summary)."""

    seconds: float = Field(ge=0)
    gpu_hours: float = Field(ge=0)
    """Wall time times the GPUs the pod asked for."""
    samples_per_second: float | None = Field(default=None, ge=0)
    steps_per_second: float | None = Field(default=None, ge=0)


class PreflightEstimate(StatusModel):
    """What the trainer's preflight estimated before downloading the model (dpo_trainer.preflight)."""

    estimated_gi_b: dict[str, float] = Field(default_factory=dict, alias="estimatedGiB")
    """Peak GPU memory per training stage (sft, dpo), GiB."""
    gpu_memory_gi_b: float | None = Field(default=None, alias="gpuMemoryGiB")
    """The memory of the GPU it was checked against (absent on CPU)."""


class Provenance(StatusModel):
    """What the model came from, as the trainer resolved it when the run started in its work directory."""

    model: str | None = Field(default=None, max_length=512)
    """The base model: name@revision, or a local directory."""
    model_sha: str | None = Field(default=None, max_length=64)
    """The base model revision's commit SHA on the Hub."""
    datasets: list[str] = Field(default_factory=list, max_length=8)
    """Hub datasets read, each name@commit SHA (or @revision when it could not be resolved)."""
    libraries: dict[str, str] = Field(default_factory=dict, max_length=16)
    """Versions of torch, transformers, TRL, PEFT, ... that trained it."""


class SFTModelStatus(StatusModel):
    """The run's merged SFT model, shared between DPOJobs by its identity (docs/trainer.md, Shared SFT models)."""

    digest: str = Field(max_length=16)
    """The SFT identity: a hash of the base model (at its resolved commit), the SFT data, template and
    hyperparameters, the quantization and the LoRA settings."""
    source: Literal["trained", "reused", "waiting"]
    """trained: this run trained it (and shared it); reused: taken from the shared cache, SFT skipped; waiting:
    another DPOJob is training the same SFT model, this run goes on with it once it is published."""
    from_: str | None = Field(default=None, alias="from", max_length=512)
    """The DPOJob (namespace/name) that trained it, or trains it while this run waits."""
    message: str | None = Field(default=None, max_length=1024)
    """The same in words, e.g. "reused 3f2a9c0d1e4b5a69 from team/sweep-beta-0.1"."""


class TrainerRef(StatusModel):
    """The Kubernetes objects running the current run."""

    job_name: str | None = None
    pod_name: str | None = None
    config_map_name: str | None = None
    last_failure: str | None = Field(default=None, max_length=1024)
    """The run's latest failed trainer pod: its name, reason and message (why the Job retried or failed)."""
    image_id: str | None = Field(default=None, max_length=512)
    """The trainer image the latest pod runs, by digest (its container status' imageID)."""


class RunRef(StatusModel):
    """A run: a training spec, first seen at a generation, and its attempt."""

    generation: int
    """metadata.generation at which this training spec was first seen; names the trainer Job."""
    attempt: int | None = None
    """Retries of a Failed run asked for with the dpo-operator.io/retry annotation (absent: the first)."""


class Bookkeeping(StatusModel):
    """What the operator keeps to decide runs; not meant for users."""

    spec_hash: str | None = None
    """Hash of what decides the model of the current run (spec.model_identity)."""
    retry_token: str | None = None
    """The dpo-operator.io/retry value the current run has seen."""
    job_uid: str | None = None
    """UID of the trainer Job the operator created for the current run: the one Job it trusts as the run (a Job's
    UID is assigned by the API server; tenants cannot write a DPOJob's status)."""


_INTERNAL = ("specHash", "retryToken")


def run_identity(status: dict[str, Any]) -> dict[str, Any]:
    """The current run as the operator identifies it: status.run plus its bookkeeping in status.internal (or, as
    statuses before 0.2 held them, in status.run itself), e.g. {"generation": 3, "specHash": "…"}."""
    run = status.get("run") or {}
    internal = status.get("internal") or {}
    return {**run, **{k: internal[k] for k in _INTERNAL if k in internal}} if run else {}


def _split_legacy_run(document: dict[str, Any]) -> dict[str, Any]:
    """A status whose run still holds specHash/retryToken (before 0.2): moved to internal."""
    run = document.get("run")
    if not isinstance(run, dict) or not set(_INTERNAL) & set(run):
        return document
    internal = {**{k: run[k] for k in _INTERNAL if k in run}, **(document.get("internal") or {})}
    return {**document, "run": {k: v for k, v in run.items() if k not in _INTERNAL}, "internal": internal}


class Run(RunRef):
    """A finished or superseded run, kept for the retraining history."""

    phase: Phase = Phase.PENDING
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
    reason: str | None = None
    """Why the DPOJob is in its phase, where that says more than the phase (ImagePullBackOff, Queued,
    HubAuthError, ...); the REASON column."""
    stage: Stage | None = None
    """The trainer stage running (or the last one), as the trainer names them: data, sft, sft_merge, dpo_data,
    dpo, dpo_merge, model_card, gates, push."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: str | None = None
    completion_time: str | None = None
    progress: Progress | None = None
    rewards: Rewards | None = None
    """Latest rewards/* metrics of the DPO stage (train batches)."""
    eval_rewards: Rewards | None = None
    """Latest eval_rewards/* metrics (the eval split: what output.gates judge)."""
    metrics: dict[str, float] | None = None
    """Latest logged metrics by their TRL names (rewards/margins, loss, eval_loss, ...)."""
    model: ModelLocation | None = None
    trainer: TrainerRef | None = None
    efficiency: dict[str, StageCost] | None = None
    """Per training stage (sft, dpo): wall seconds, GPU-hours, samples and steps per second."""
    preflight: PreflightEstimate | None = None
    """The preflight's estimate of each training stage's peak GPU memory, and the GPU's memory."""
    provenance: Provenance | None = None
    """The exact base model and dataset revisions and the library versions (also in the model card)."""
    sft_model: SFTModelStatus | None = None
    """Where the run's merged SFT model comes from: trained, reused from another DPOJob, or waited for."""
    rules: list[RuleHit] = Field(default_factory=list, max_length=MAX_RULE_HITS)
    """Stop rules that fired in the current run, in order: a warn rule sets the MetricWarning condition."""
    retries: int = 0
    """Trainer pods of the current run that failed and were retried (the one that failed the run is not)."""
    run: RunRef | None = None
    """The current run."""
    runs: list[Run] = Field(default_factory=list)
    """Previous runs and attempts, oldest first (capped)."""
    internal: Bookkeeping | None = None
    """The operator's bookkeeping of the current run (spec hash, retry annotation seen)."""

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> DPOJobStatus:
        """Parse a status document such as the API server holds. A value this version cannot read (another
        version's enum value, say) is left out with its top-level field or list item rather than failing every
        reconcile of the DPOJob: the status is recomputed from the cluster anyway."""
        document = _split_legacy_run(document)
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
