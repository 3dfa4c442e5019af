"""The DPOJob's words, each defined here and nowhere else: phases, condition types, trainer stages, reasons (the
trainer's and the operator's, with their meaning, exit code, whether they are retried and what to change), Event
reasons, and the Kubernetes words the operator reads that collide with them. The CRD's enums, the docs' tables
and the Argo CD health check are generated from or tested against these; a test finds each string in this module
only (tests/dpojob_api/test_vocabulary.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal


class Phase(StrEnum):
    """A DPOJob's status.phase."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})
IN_PROGRESS_PHASES = frozenset({Phase.PENDING, Phase.RUNNING})


class ConditionType(StrEnum):
    """The conditions the operator writes, as kstatus (Flux, cli-utils, Config Sync) reads them: Ready always (True
    once the run succeeded, Unknown while it is in progress, False otherwise), the others only while True:
    Reconciling (pending or running), Stalled (failed: nothing happens until the spec or the retry annotation
    changes), Suspended. The CRD takes any type, so a later version may add one without breaking an older CRD."""

    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    SUSPENDED = Phase.SUSPENDED.value
    METRIC_WARNING = "MetricWarning"
    """True once a warn rule (spec.sft/dpo.stopRules, or a built-in one) fired in the current run."""


class Stage(StrEnum):
    """The trainer's stages, in the order they run (status.stage, progress events, the work directory)."""

    DATA = "data"
    SFT = "sft"
    SFT_MERGE = "sft_merge"
    DPO_DATA = "dpo_data"
    DPO = "dpo"
    DPO_MERGE = "dpo_merge"
    MODEL_CARD = "model_card"
    GATES = "gates"
    PUSH = "push"


STAGE_WEIGHTS: dict[Stage, int] = {
    Stage.DATA: 1,
    Stage.SFT: 40,
    Stage.SFT_MERGE: 3,
    Stage.DPO_DATA: 1,
    Stage.DPO: 50,
    Stage.DPO_MERGE: 3,
    Stage.MODEL_CARD: 1,
    Stage.GATES: 1,
    Stage.PUSH: 1,
}
"""Share of the whole run each trainer stage covers, for status.progress.percent (training dominates)."""
TrainingStage = Literal[Stage.SFT, Stage.DPO]
"""The two stages that train (each has an adapter, a log history and a data stage)."""


class Reason(StrEnum):
    """Why a DPOJob is in its phase (status.reason, the Ready condition's reason, a Warning Event's reason).

    The trainer's reasons come from its termination message and exit code; the operator's from what it observes;
    a few are Kubernetes' own, passed on. Meaning, exit code, retries and what to change: REASONS."""

    SUCCEEDED = Phase.SUCCEEDED.value
    INVALID_SPEC = "InvalidSpec"
    DATASET_ERROR = "DatasetError"
    MODEL_LOAD_ERROR = "ModelLoadError"
    HUB_AUTH_ERROR = "HubAuthError"
    HUB_ERROR = "HubError"
    OUT_OF_MEMORY = "OutOfMemory"
    TRAINING_ERROR = "TrainingError"
    QUALITY_GATE_FAILED = "QualityGateFailed"
    GPU_UNAVAILABLE = "GPUUnavailable"
    GPU_OUT_OF_MEMORY = "GPUOutOfMemory"
    INTERRUPTED = "Interrupted"
    INSUFFICIENT_GPU_MEMORY = "InsufficientGPUMemory"
    STOPPED_BY_RULE = "StoppedByRule"
    DIVERGED = "Diverged"
    HUB_WRITE_DENIED = "HubWriteDenied"
    RUN_REVISION_TAKEN = "RunRevisionTaken"
    OUTPUT_NOT_WRITABLE = "OutputNotWritable"
    HUB_READ_DENIED = "HubReadDenied"
    METRIC_RULE = "MetricRule"
    LIKELIHOOD_DISPLACEMENT = "LikelihoodDisplacement"
    # The operator's
    CREATING = "Creating"
    POD_CREATING = "PodCreating"
    POD_PENDING = "PodPending"
    RUNNING = Phase.RUNNING.value
    COMPLETING = "Completing"
    SUSPENDED = Phase.SUSPENDED.value
    QUEUED = "Queued"
    NOT_OWNED = "NotOwned"
    CREATE_REJECTED = "CreateRejected"
    WAITING_FOR_CLEANUP = "WaitingForCleanup"
    FAILED_CREATE = "FailedCreate"
    TRAINER_EXITED = "TrainerExited"
    POD_FAILED = "PodFailed"
    JOB_FAILED = "JobFailed"
    WAITING_FOR_SFT = "WaitingForSFT"
    # Kubernetes', passed on (a pod's or Job's own reason is passed on as it is, these are the ones we explain)
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"


Origin = Literal["trainer", "operator", "kubernetes"]


@dataclass(frozen=True)
class ReasonInfo:
    """What one reason means to the operator and to users."""

    origin: Origin
    meaning: str
    fix: str
    """What to change."""
    exit_code: int | None = None
    """The trainer's exit code for it (the trainer's reasons only)."""
    retried: bool = False
    """Whether the Job retries a trainer pod that failed with it (up to spec.runtime.backoffLimit). A failure the
    same spec meets again (a bad spec, dataset, model or token, a failed gate, CUDA memory) ends the run at once:
    a retry would only repeat the download and the training before failing the same way."""


_EDIT_APPLIES = "while no trainer has started, an edit re-creates the trainer Job at once"

REASONS: dict[Reason, ReasonInfo] = {
    Reason.SUCCEEDED: ReasonInfo(
        "trainer", "the merged model is saved (and pushed when `output.hub` is set)", "—", exit_code=0
    ),
    Reason.INVALID_SPEC: ReasonInfo(
        "trainer",
        "the DPOJob file is unreadable, not one DPOJob, or fails validation "
        "(the operator: also a 400/422 from the API server)",
        "the field the message names",
        exit_code=2,
    ),
    Reason.DATASET_ERROR: ReasonInfo(
        "trainer",
        "a dataset is missing or unreadable, lacks a column a template names, or ends up empty",
        "the source, `format` or template the message names (it lists the columns that exist)",
        exit_code=3,
    ),
    Reason.MODEL_LOAD_ERROR: ReasonInfo(
        "trainer",
        "the base model or its tokenizer cannot be loaded",
        "`model.name`/`revision`; for a gated model, a token that may read it",
        exit_code=4,
    ),
    Reason.HUB_AUTH_ERROR: ReasonInfo(
        "trainer",
        "the Hub refused the token (401/403, gated repo) or no token for a push",
        "the Secret of `hubTokenSecretRef`: a write token for the target namespace",
        exit_code=5,
    ),
    Reason.HUB_ERROR: ReasonInfo(
        "trainer",
        "any other Hub failure (repo not found, server error, network)",
        "the repository id, or wait",
        exit_code=6,
        retried=True,
    ),
    Reason.OUT_OF_MEMORY: ReasonInfo(
        "trainer",
        "host memory ran out inside the trainer (a kernel OOM kill is retried)",
        "`runtime.memory`",
        exit_code=7,
    ),
    Reason.TRAINING_ERROR: ReasonInfo(
        "trainer",
        "anything else that failed while training, merging or writing",
        "read `debug.log` (gpu.md)",
        exit_code=8,
        retried=True,
    ),
    Reason.QUALITY_GATE_FAILED: ReasonInfo(
        "trainer",
        "a check of `output.gates` missed: nothing pushed, the merged model kept",
        "the training spec, or the gate",
        exit_code=9,
    ),
    Reason.GPU_UNAVAILABLE: ReasonInfo(
        "trainer",
        "`runtime.gpus` > 0 but torch cannot use CUDA (a retry may land on a working node)",
        "the node's driver (>= 580) and device plugin, or `runtime.gpus: 0`",
        exit_code=10,
        retried=True,
    ),
    Reason.GPU_OUT_OF_MEMORY: ReasonInfo(
        "trainer",
        "CUDA ran out of GPU memory; the message names the stage, the GPU's memory and the knobs to turn",
        "the stage's `batchSize` (and `gradientAccumulationSteps`), `gradientCheckpointing`, `maxLength`",
        exit_code=11,
    ),
    Reason.INTERRUPTED: ReasonInfo(
        "trainer",
        "SIGTERM/SIGINT; a checkpoint was saved when possible, a rerun resumes",
        "nothing: it resumes",
        exit_code=143,
        retried=True,
    ),
    Reason.INSUFFICIENT_GPU_MEMORY: ReasonInfo(
        "trainer",
        "the preflight estimate of a stage's peak GPU memory exceeds the GPU's; nothing was downloaded or trained",
        "what the message names: the stage's `batchSize`, `gradientCheckpointing`, `maxLength`, or a larger GPU",
        exit_code=14,
    ),
    Reason.STOPPED_BY_RULE: ReasonInfo(
        "trainer",
        "a `fail` stop rule fired: training stopped with a checkpoint kept, nothing merged or pushed",
        "the training spec, or the rule (`stopRules`); a retry resumes from the checkpoint",
        exit_code=12,
    ),
    Reason.DIVERGED: ReasonInfo(
        "trainer",
        "the loss became NaN or infinite (the built-in rule): training stopped, nothing pushed",
        "lower the stage's `learningRate`, raise `warmupSteps`, check the data",
        exit_code=13,
    ),
    Reason.HUB_WRITE_DENIED: ReasonInfo(
        "trainer",
        "preflight: the token may not write to `output.hub.repoId` (a read token; its user is not that namespace "
        "nor a write member of that organization; a fine-grained token without write there); nothing trained",
        "the Secret of `hubTokenSecretRef`: a write token of a user who may write there; or `output.hub.repoId`",
        exit_code=15,
    ),
    Reason.RUN_REVISION_TAKEN: ReasonInfo(
        "trainer",
        "preflight: the run's tag or branch (`run-g<generation>`) already names a commit this run did not push "
        "(an earlier DPOJob of the same name, deleted and recreated); nothing trained",
        "delete that tag or branch on the Hub, or set `output.hub.runRevision: none`, or another `output.hub.repoId`",
        exit_code=16,
    ),
    Reason.OUTPUT_NOT_WRITABLE: ReasonInfo(
        "trainer",
        "preflight: the work directory or `output.directory` cannot be written (a read-only filesystem or volume, "
        "no permission); nothing downloaded (the operator refuses such a path as InvalidSpec before any pod)",
        "`output.directory` / `checkpointing.directory`: a path on a writable volume (`runtime.outputVolume` at "
        "/output, the checkpoint volume)",
        exit_code=17,
    ),
    Reason.HUB_READ_DENIED: ReasonInfo(
        "trainer",
        "preflight: the base model or a dataset is gated and the token's user was not granted access; nothing "
        "downloaded",
        "request access on the repo's Hub page with the token's user, or use a token of a user who has it",
        exit_code=18,
    ),
    Reason.METRIC_RULE: ReasonInfo(
        "trainer", "a `warn` stop rule fired (the MetricWarning condition); training goes on", "nothing, or the run"
    ),
    Reason.LIKELIHOOD_DISPLACEMENT: ReasonInfo(
        "trainer",
        "DPO pushes the chosen and the rejected answers' log-probabilities both down while the margin grows "
        "(the built-in warn rule); training goes on",
        "a lower `learningRate` or a higher `beta`; `lossType: [sigmoid, sft]` keeps the chosen answers likely",
    ),
    Reason.CREATING: ReasonInfo("operator", "the operator is creating the run's trainer Job", "nothing: routine"),
    Reason.POD_CREATING: ReasonInfo(
        "operator", "waiting for the Job controller to create the trainer pod", "nothing: routine"
    ),
    Reason.POD_PENDING: ReasonInfo("operator", "the trainer pod is waiting to start", "nothing: routine"),
    Reason.RUNNING: ReasonInfo("operator", "the trainer pod is running", "nothing"),
    Reason.COMPLETING: ReasonInfo(
        "operator", "the trainer Job completed; the operator is reading the trainer's result", "nothing: routine"
    ),
    Reason.SUSPENDED: ReasonInfo(
        "operator", "`spec.suspend` is true: the trainer Job is deleted", "nothing; `spec.suspend: false` resumes it"
    ),
    Reason.QUEUED: ReasonInfo(
        "operator", "Kueue holds the trainer Job in its queue", "nothing, or the queue (kueue.md)"
    ),
    Reason.NOT_OWNED: ReasonInfo(
        "operator",
        "an object with the run's name exists that names no or another controller",
        "delete or rename that object",
    ),
    Reason.CREATE_REJECTED: ReasonInfo(
        "operator",
        "the API server refused the run's objects (403 or another 4xx: quota, RBAC, an admission policy)",
        "the namespace's quota or policy; retried at most once per resync period",
    ),
    Reason.WAITING_FOR_CLEANUP: ReasonInfo(
        "operator",
        "a previous Job or pod of the same name is still going away",
        "nothing: the run's Job is created once it is gone",
    ),
    Reason.FAILED_CREATE: ReasonInfo(
        "operator",
        "the Job controller cannot create the trainer pod",
        "fix spec.runtime (serviceAccountName, priorityClassName, requests within the namespace's quota): "
        + _EDIT_APPLIES,
    ),
    Reason.TRAINER_EXITED: ReasonInfo(
        "operator",
        "the trainer exited non-zero without a termination message (killed, or crashed before writing one)",
        "read the pod's log",
    ),
    Reason.POD_FAILED: ReasonInfo(
        "operator", "the trainer pod failed before its container ran (e.g. evicted)", "the pod's status message"
    ),
    Reason.JOB_FAILED: ReasonInfo("operator", "the trainer Job failed without a failed pod to explain it", "—"),
    Reason.WAITING_FOR_SFT: ReasonInfo(
        "operator",
        "the trainer waits while another DPOJob trains the same SFT model (status.sftModel names it); it goes on "
        "from that model once published, or trains it itself if that DPOJob stops",
        "nothing; `sft.reuse: false` trains its own",
    ),
    Reason.UNSCHEDULABLE: ReasonInfo(
        "kubernetes",
        "no node fits the trainer pod (the scheduler's message, e.g. `Insufficient nvidia.com/gpu`)",
        f"fix spec.runtime (gpus, cpu, memory, nodeSelector, tolerations, affinity): {_EDIT_APPLIES}",
    ),
    Reason.IMAGE_PULL_BACK_OFF: ReasonInfo(
        "kubernetes",
        "the trainer image cannot be pulled",
        f"fix spec.runtime.image (or spec.runtime.imagePullSecrets): {_EDIT_APPLIES}",
    ),
    Reason.CREATE_CONTAINER_CONFIG_ERROR: ReasonInfo(
        "kubernetes",
        "the trainer container cannot be configured (e.g. a missing token Secret)",
        f"check spec.hubTokenSecretRef and the volume claims in spec.runtime (they must exist): {_EDIT_APPLIES}",
    ),
    Reason.DEADLINE_EXCEEDED: ReasonInfo(
        "kubernetes", "the Job ran past `runtime.activeDeadlineSeconds`", "`runtime.activeDeadlineSeconds`"
    ),
    Reason.BACKOFF_LIMIT_EXCEEDED: ReasonInfo(
        "kubernetes", "trainer pods failed more often than `runtime.backoffLimit`", "the last pod's failure"
    ),
}
"""Every reason: where it comes from, what it means, what to change; the trainer's with exit code and retries."""
TRAINER_REASONS: dict[Reason, ReasonInfo] = {r: info for r, info in REASONS.items() if info.exit_code is not None}
"""The reasons a trainer run ends with (termination message and exit code)."""
RULE_WARNINGS = frozenset({Reason.METRIC_RULE, Reason.LIKELIHOOD_DISPLACEMENT})
"""The reasons of warn rules: the MetricWarning condition's, and status.reason while the run goes on."""
EXIT_CODES: dict[Reason, int] = {r: info.exit_code for r, info in REASONS.items() if info.exit_code is not None}
"""The trainer's exit code for each of its reasons."""
FAIL_AT_ONCE = frozenset(r for r, info in TRAINER_REASONS.items() if not info.retried and EXIT_CODES[r])
"""Trainer reasons that end the run at the first failed pod."""
FAIL_AT_ONCE_EXIT_CODES = tuple(sorted(EXIT_CODES[r] for r in FAIL_AT_ONCE))
STUCK_BEFORE_START = frozenset(
    {
        Reason.UNSCHEDULABLE,
        Reason.IMAGE_PULL_BACK_OFF,
        Reason.CREATE_CONTAINER_CONFIG_ERROR,
        Reason.FAILED_CREATE,
    }
)
"""Ways a run gets stuck before its trainer starts: the status message ends with the fix."""
PENDING_WARNINGS = STUCK_BEFORE_START | {Reason.WAITING_FOR_CLEANUP, Reason.CREATE_REJECTED, Reason.NOT_OWNED}
"""Reasons of a Pending DPOJob worth a Warning Event (waiting for a pod to start is routine)."""


class EventReason(StrEnum):
    """Reasons of the Events the operator posts that are not a Reason (those are posted under the Reason)."""

    JOB_CREATED = "JobCreated"
    JOB_REPLACED = "JobReplaced"
    UNTRUSTED_JOB = "UntrustedJob"
    PREEMPTION_RESTARTS_TRAINING = "PreemptionRestartsTraining"
    NEW_RUN = "NewRun"
    STAGE_STARTED = "StageStarted"
    RETRYING = "Retrying"
    RESUMED = "Resumed"
    CLEANED = "Cleaned"
    STOPPED_EARLY = "StoppedEarly"
    SFT_REUSED = "SFTReused"


class PodPhase(StrEnum):
    """Kubernetes' pod phases (read, never written)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


FINISHED_POD_PHASES = frozenset({PodPhase.SUCCEEDED, PodPhase.FAILED})


class JobConditionType(StrEnum):
    """Kubernetes' Job condition types the operator reads."""

    COMPLETE = "Complete"
    FAILED = "Failed"


WAITING_REASONS: dict[str, Reason] = {
    "ErrImagePull": Reason.IMAGE_PULL_BACK_OFF,
    Reason.IMAGE_PULL_BACK_OFF.value: Reason.IMAGE_PULL_BACK_OFF,
    "InvalidImageName": Reason.IMAGE_PULL_BACK_OFF,
    Reason.CREATE_CONTAINER_CONFIG_ERROR.value: Reason.CREATE_CONTAINER_CONFIG_ERROR,
    "CreateContainerError": Reason.CREATE_CONTAINER_CONFIG_ERROR,
}
"""A waiting trainer container's reason (Kubernetes') -> the Reason the DPOJob shows."""
OOM_KILLED = "OOMKilled"
"""A terminated container's reason when the kernel killed it for memory (Kubernetes')."""
