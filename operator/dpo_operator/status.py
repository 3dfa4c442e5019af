"""Compute a DPOJob's status from what is observed in the cluster. Pure functions, no API calls.

`compute_status` folds the trainer Job, its pods, the trainer's progress (from the pod log) and the previous
status into the new status, a `DPOJobStatus` (the schema the CRD declares; `to_document()` gives what the API
server stores); `transition_events` says which Events the change between two stored statuses deserves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from dpojob_api.progress import TerminationMessage, status_metrics
from dpojob_api.status import (
    MAX_CONDITION_MESSAGE,
    MAX_CONDITION_REASON,
    MAX_RULE_HITS,
    Bookkeeping,
    Condition,
    DPOJobStatus,
    ModelLocation,
    Progress,
    Rewards,
    RuleHit,
    Run,
    RunRef,
    TrainerRef,
)
from dpojob_api.vocabulary import (
    FAIL_AT_ONCE,
    FAIL_AT_ONCE_EXIT_CODES,
    IN_PROGRESS_PHASES,
    OOM_KILLED,
    PENDING_WARNINGS,
    REASONS,
    STUCK_BEFORE_START,
    TERMINAL_PHASES,
    WAITING_REASONS,
    ConditionType,
    EventReason,
    JobConditionType,
    Phase,
    PodPhase,
    Reason,
    Stage,
)

from .manifests import CONTAINER

MAX_RUN_HISTORY = 10
# Carried from the previous status while the run is the same; reset when a new run starts.
_RUN_FIELDS = (
    "stage",
    "progress",
    "metrics",
    "rewards",
    "eval_rewards",
    "model",
    "start_time",
    "completion_time",
    "retries",
    "rules",
    "preflight",
    "efficiency",
    "provenance",
    "sft_model",
)
_SUMMARY_FIELDS = ("efficiency", "provenance")
"""From the trainer's last line (its summary): it may be read after the run's outcome is final."""


def now_rfc3339(now: datetime | None = None) -> str:
    """Kubernetes timestamp format."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Observed:
    """Everything the status depends on, gathered by the reconciler."""

    generation: int
    run: dict[str, Any]
    """The run the spec asks for, as reconciler.current_run identifies it: {"generation": G, "specHash": h, …}."""
    spec_error: str | None = None
    suspended: bool = False
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: dict[str, Any] | None = None
    """Status fields from the trainer's log (TrainerProgress.status_fields), if any were read."""
    waiting: str | None = None
    """Why the run's Job cannot be created yet (a previous Job or pod of the same name still going away)."""
    pod_creation_error: str | None = None
    """Why the Job controller cannot create the trainer pod (its FailedCreate Event), while the Job has none."""
    not_owned: str | None = None
    """An object with the run's name exists that is not this DPOJob's (it names no or another controller)."""
    rejected: tuple[int, str] | None = None
    """The API server refused to create the run's children: HTTP code and message."""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass(frozen=True)
class Outcome:
    """Phase and the condition reason/message explaining it."""

    phase: Phase
    reason: str
    """A Reason, or a pod's or Job's own reason passed on."""
    message: str = ""
    pod_name: str | None = None
    final: TerminationMessage | None = None
    """The trainer's termination message (model, metrics; the stage a failure stopped in) when it finished."""


def _latest(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


def container_state(pod: dict[str, Any]) -> dict[str, Any]:
    """The trainer container's state: {"waiting"|"running"|"terminated": {...}} or {} (by name: admission webhooks
    add sidecars)."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    trainer = next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else None)
    return (trainer.get("state") or {}) if trainer else {}


def termination_message(pod: dict[str, Any]) -> TerminationMessage:
    """The trainer's termination message of a finished pod, validated (pod output is untrusted)."""
    return TerminationMessage.parse((container_state(pod).get("terminated") or {}).get("message"))


def pod_failure(pod: dict[str, Any]) -> tuple[str, str]:
    """Reason code and one-line message for a failed trainer pod."""
    terminated = container_state(pod).get("terminated") or {}
    final = termination_message(pod)
    if terminated.get("reason") == OOM_KILLED:
        return (
            Reason.OUT_OF_MEMORY,
            "the trainer container was OOMKilled: raise spec.runtime.memory or lower batch sizes",
        )
    if final.reason:
        return final.reason, final.message
    if terminated:
        tail = (terminated.get("message") or "").strip().splitlines()[-1:] or [""]
        return Reason.TRAINER_EXITED, f"trainer exited with code {terminated.get('exitCode')}: {tail[0]}".rstrip(": ")
    reason = pod.get("status", {}).get("reason")
    return (reason or Reason.POD_FAILED), pod.get("status", {}).get("message", "the trainer pod failed")


def _image_id(pod: dict[str, Any]) -> str | None:
    """The image the pod's trainer container runs, by digest, once the kubelet has pulled it."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    trainer = next((s for s in statuses if s.get("name") == CONTAINER), None)
    image_id = (trainer or {}).get("imageID")
    return image_id[:512] if isinstance(image_id, str) and image_id else None


def trainer_started(pod: dict[str, Any]) -> bool:
    """Whether the pod's trainer container has ever run (not only waited for its image, node or config)."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    for status in statuses:
        if status.get("name") == CONTAINER:
            state = status.get("state") or {}
            return bool(state.get("running") or state.get("terminated") or status.get("lastState") or {})
    return False


def fails_at_once(pod: dict[str, Any]) -> bool:
    """The trainer pod failed in a way the same spec meets again (FAIL_AT_ONCE: its termination message's reason,
    else its exit code): the run is not retried. A kernel OOM kill keeps its retries (the next pod may fit)."""
    if pod.get("status", {}).get("phase") != PodPhase.FAILED:
        return False
    terminated = container_state(pod).get("terminated") or {}
    if not terminated or terminated.get("reason") == OOM_KILLED:
        return False
    reason = termination_message(pod).reason
    return reason in FAIL_AT_ONCE if reason else terminated.get("exitCode") in FAIL_AT_ONCE_EXIT_CODES


def pending_problem(pod: dict[str, Any]) -> tuple[str, str] | None:
    """Why a pod is stuck before running (unschedulable, image pull, config) and what to change, or None."""
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = condition.get("reason") or Reason.UNSCHEDULABLE
            return reason, _with_fix(reason, condition.get("message", ""))
    waiting = container_state(pod).get("waiting") or {}
    if waiting.get("reason") in WAITING_REASONS:
        reason = WAITING_REASONS[waiting["reason"]]
        return reason, _with_fix(reason, waiting.get("message") or waiting["reason"])
    return None


def _with_fix(reason: str, message: str) -> str:
    """The message of a run stuck before its trainer starts, with what to change (REASONS' fix)."""
    return f"{message.rstrip('. ')} — {REASONS[Reason(reason)].fix}" if reason in STUCK_BEFORE_START else message


def job_condition(job: dict[str, Any], kind: JobConditionType) -> dict[str, Any] | None:
    """The Job's condition of that type if it is True."""
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return condition
    return None


def observe_outcome(obs: Observed) -> Outcome:
    """Phase of the current run from the Job and its pods."""
    if obs.spec_error is not None:
        return Outcome(Phase.FAILED, Reason.INVALID_SPEC, obs.spec_error)
    if obs.suspended:
        return Outcome(Phase.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true: the trainer is stopped")
    if obs.job is None:
        if obs.not_owned:
            return Outcome(Phase.PENDING, Reason.NOT_OWNED, obs.not_owned)
        if obs.rejected is not None:
            # 400/422: the spec produced an object the server rejects (fix the spec); 403 and others: the
            # namespace refuses it (quota, RBAC, admission policy) — retried at the next spec change.
            code, message = obs.rejected
            if code in (400, 422):
                return Outcome(Phase.FAILED, Reason.INVALID_SPEC, message)
            return Outcome(Phase.PENDING, Reason.CREATE_REJECTED, message)
        if obs.waiting:
            return Outcome(Phase.PENDING, Reason.WAITING_FOR_CLEANUP, obs.waiting)
        return Outcome(Phase.PENDING, Reason.CREATING, "creating the trainer Job")
    pods = obs.pods
    latest = _latest(pods)
    if (obs.job.get("spec") or {}).get("suspend") and not job_condition(obs.job, JobConditionType.COMPLETE):
        # Only Kueue suspends our Jobs (a user's spec.suspend deletes the Job): queued, or preempted.
        queue = (obs.job["metadata"].get("labels") or {}).get("kueue.x-k8s.io/queue-name", "its queue")
        return Outcome(Phase.PENDING, Reason.QUEUED, f"waiting for Kueue to admit the trainer Job in queue {queue}")
    if job_condition(obs.job, JobConditionType.COMPLETE):
        done = [p for p in pods if p.get("status", {}).get("phase") == PodPhase.SUCCEEDED]
        pod = _latest(done)
        if pod is None and latest is not None:
            # The Job's and the pods' watches deliver independently: a final status written before the pod's
            # own Succeeded arrives would freeze without the termination message (where the model went).
            return Outcome(
                Phase.RUNNING, Reason.COMPLETING, "the trainer Job completed; reading the trainer's result", None
            )
        final = termination_message(pod) if pod else None
        name = pod["metadata"]["name"] if pod else None
        return Outcome(Phase.SUCCEEDED, Reason.SUCCEEDED, "training finished", name, final)
    failed_condition = job_condition(obs.job, JobConditionType.FAILED)
    at_once = _latest([p for p in pods if fails_at_once(p)])
    if at_once is not None and not failed_condition:
        # Servers without podFailurePolicy would retry it: the run fails now and the reconciler stops the Job.
        reason, message = pod_failure(at_once)
        return Outcome(Phase.FAILED, reason, message, at_once["metadata"]["name"], termination_message(at_once))
    if failed_condition:
        failed = _latest([p for p in pods if p.get("status", {}).get("phase") == PodPhase.FAILED])
        if failed_condition.get("reason") == Reason.DEADLINE_EXCEEDED or failed is None:
            reason = failed_condition.get("reason") or Reason.JOB_FAILED
            name = failed["metadata"]["name"] if failed else None
            return Outcome(Phase.FAILED, reason, failed_condition.get("message", ""), name)
        reason, message = pod_failure(failed)
        return Outcome(Phase.FAILED, reason, message, failed["metadata"]["name"], termination_message(failed))
    if latest is None:
        if obs.pod_creation_error:
            message = _with_fix(
                Reason.FAILED_CREATE, f"the Job controller cannot create the trainer pod: {obs.pod_creation_error}"
            )
            return Outcome(Phase.PENDING, Reason.FAILED_CREATE, message)
        return Outcome(Phase.PENDING, Reason.POD_CREATING, "waiting for the Job controller to create the trainer pod")
    name = latest["metadata"]["name"]
    phase = latest.get("status", {}).get("phase")
    if phase == PodPhase.RUNNING:
        return Outcome(Phase.RUNNING, Reason.RUNNING, f"trainer pod {name} is running", name)
    problem = pending_problem(latest)
    if problem is not None:
        return Outcome(Phase.PENDING, problem[0], problem[1], name)
    return Outcome(Phase.PENDING, Reason.POD_PENDING, f"trainer pod {name} is {phase or PodPhase.PENDING}", name)


def _conditions(old: list[Condition], outcome: Outcome, generation: int, now: str) -> list[Condition]:
    """The kstatus conditions (ConditionType) for the outcome: Ready always, with the outcome's reason and message
    (True once succeeded, Unknown while in progress, False when failed or suspended), and Reconciling, Stalled or
    Suspended while they are True. lastTransitionTime is kept where a condition's status did not change."""
    in_progress = outcome.phase in IN_PROGRESS_PHASES
    ready: Literal["True", "False", "Unknown"] = (
        "True" if outcome.phase == Phase.SUCCEEDED else "Unknown" if in_progress else "False"
    )
    wanted = {ConditionType.READY: ready}
    if in_progress:
        wanted[ConditionType.RECONCILING] = "True"
    elif outcome.phase == Phase.FAILED:
        wanted[ConditionType.STALLED] = "True"
    elif outcome.phase == Phase.SUSPENDED:
        wanted[ConditionType.SUSPENDED] = "True"
    previous = {c.type: c for c in old}
    conditions = []
    for kind in ConditionType:
        if kind not in wanted:
            continue
        before = previous.get(kind)
        conditions.append(
            Condition(
                type=kind,
                status=wanted[kind],
                reason=outcome.reason[:MAX_CONDITION_REASON],
                message=outcome.message[:MAX_CONDITION_MESSAGE],
                last_transition_time=before.last_transition_time if before and before.status == wanted[kind] else now,
                observed_generation=generation,
            )
        )
    return conditions


def _run_ref(identity: dict[str, Any]) -> RunRef:
    """The user-facing part of a run identity (generation, attempt); the rest is status.internal."""
    return RunRef(generation=identity["generation"], attempt=identity.get("attempt"))


def archived_run(status: DPOJobStatus, run: RunRef) -> Run:
    """The history entry for `run`, the run `status` describes."""
    entry = {
        "phase": status.phase,
        "reason": _reason(status),
        "start_time": status.start_time,
        "completion_time": status.completion_time,
        "rewards": status.rewards,
        "metrics": status.metrics,
        "model": status.model,
    }
    known = {name: value for name, value in entry.items() if value is not None}  # what the status lacks stays out
    return Run(generation=run.generation, attempt=run.attempt, retries=status.retries, **known)


def _reason(status: DPOJobStatus) -> str | None:
    """The reason of a finished run's outcome: its Ready condition's (also in statuses of earlier versions)."""
    if status.phase not in TERMINAL_PHASES:
        return None
    return next((c.reason for c in status.conditions if c.type == ConditionType.READY), None)


def run_finished(old: dict[str, Any], run: dict[str, Any]) -> bool:
    """`_finished` for the status document the API server holds and the run dict the reconciler works with."""
    return _finished(DPOJobStatus.from_document(old), _run_ref(run))


def _finished(status: DPOJobStatus, run: RunRef) -> bool:
    """The status already holds this run's final outcome, so nothing may change it any more.

    InvalidSpec is not final: the spec can be fixed through fields (runtime) that do not start a new run.
    """
    return status.run == run and status.phase in TERMINAL_PHASES and _reason(status) != Reason.INVALID_SPEC


def _is_newer(reported: DPOJobStatus, old: DPOJobStatus) -> bool:
    """A replayed log (operator restart) must not move the status back to an earlier report."""
    new_at = reported.progress and reported.progress.updated_at
    old_at = old.progress and old.progress.updated_at
    return not (new_at and old_at) or utc_from_rfc3339(new_at) >= utc_from_rfc3339(old_at)


def compute_status(old: dict[str, Any], obs: Observed) -> DPOJobStatus:
    """The new status, from the one the API server holds (`old`). Progress and history are carried over; the run's
    outcome is recomputed. Its to_document() is what the server is to store."""
    now = now_rfc3339(obs.now)
    previous = DPOJobStatus.from_document(old)
    run = _run_ref(obs.run)
    same_run = previous.run == run
    carried = {name: getattr(previous, name) for name in _RUN_FIELDS if same_run and name in previous.model_fields_set}
    runs = list(previous.runs)
    if previous.run and not same_run:
        runs = [*runs, archived_run(previous, previous.run)][-MAX_RUN_HISTORY:]
    frozen = _finished(previous, run)
    if frozen and previous.phase:
        outcome = Outcome(previous.phase, _reason(previous) or previous.phase, _message(previous))
    else:
        outcome = observe_outcome(obs)
    status = DPOJobStatus(
        **carried,
        observed_generation=obs.generation,
        run=run,
        runs=runs,
        phase=outcome.phase,
        reason=outcome.reason if outcome.reason != outcome.phase else None,
        internal=Bookkeeping(
            spec_hash=obs.run.get("specHash"),
            retry_token=obs.run.get("retryToken"),
            job_uid=obs.job["metadata"].get("uid") if obs.job is not None else None,
        ),
        conditions=_conditions(previous.conditions if same_run else [], outcome, obs.generation, now),
    )

    if obs.job is not None:
        latest = _latest(obs.pods)
        name = obs.job["metadata"]["name"]
        failed = _latest([p for p in obs.pods if p.get("status", {}).get("phase") == PodPhase.FAILED])
        status.trainer = TrainerRef(
            job_name=name,
            config_map_name=name,
            pod_name=outcome.pod_name or (latest["metadata"]["name"] if latest else None),
            image_id=_image_id(latest) if latest else None,
            last_failure=f"{failed['metadata']['name']}: {': '.join(pod_failure(failed))}"[:1024] if failed else None,
        )
        # Every failed pod was retried but the one that failed the run. A Job recreated on resume starts counting
        # again; the run's count never goes down.
        failed_pods = int(obs.job.get("status", {}).get("failed") or 0)
        retried = failed_pods - 1 if outcome.phase == Phase.FAILED and failed_pods else failed_pods
        status.retries = max(retried, status.retries)
    elif same_run and previous.trainer:
        status.trainer = previous.trainer

    if outcome.phase not in (Phase.PENDING, Phase.SUSPENDED) and obs.spec_error is None:
        status.start_time = status.start_time or (obs.job or {}).get("status", {}).get("startTime") or now
    if obs.progress and not frozen:
        reported = DPOJobStatus.from_document(obs.progress)
        if not same_run or _is_newer(reported, previous):
            status = status.model_copy(update={name: getattr(reported, name) for name in reported.model_fields_set})
    elif obs.progress:
        reported = DPOJobStatus.from_document(obs.progress)
        for name in _SUMMARY_FIELDS:
            if getattr(status, name) is None and getattr(reported, name) is not None:
                setattr(status, name, getattr(reported, name))
    if same_run and previous.rules:
        status.rules = _union_rules(previous.rules, status.rules)
    _warn_of_rules(status, previous.conditions if same_run else [], obs.generation, now)
    waiting_for_sft = status.sft_model is not None and status.sft_model.source == "waiting"
    if status.phase == Phase.RUNNING and not status.reason and waiting_for_sft:
        status.reason = Reason.WAITING_FOR_SFT  # another DPOJob trains the same SFT model (status.sftModel says which)
    if outcome.phase not in TERMINAL_PHASES:
        status.completion_time = None  # e.g. an InvalidSpec fixed through runtime: the run goes on
    else:
        status.completion_time = status.completion_time or now
        if outcome.final is not None:
            _apply_final(status, outcome.final)
    return status


def _union_rules(old: list[RuleHit], new: list[RuleHit]) -> list[RuleHit]:
    """The rule hits of earlier pods of the run, then this pod's new ones (each rule of a stage once)."""
    seen = {(hit.stage, hit.rule) for hit in old}
    return [*old, *(hit for hit in new if (hit.stage, hit.rule) not in seen)][:MAX_RULE_HITS]


def _warn_of_rules(status: DPOJobStatus, old: list[Condition], generation: int, now: str) -> None:
    """A warn rule that fired in the run: the MetricWarning condition, and status.reason while it runs on."""
    warnings = [hit for hit in status.rules if hit.action == "warn"]
    if not warnings:
        return
    latest = warnings[-1]
    before = next((c for c in old if c.type == ConditionType.METRIC_WARNING and c.status == "True"), None)
    warning = Condition(
        type=ConditionType.METRIC_WARNING,
        status="True",
        reason=latest.reason,
        message=latest.message,
        last_transition_time=before.last_transition_time if before else now,
        observed_generation=generation,
    )
    status.conditions = [*status.conditions, warning]
    if status.phase == Phase.RUNNING:
        status.reason = latest.reason


def _message(status: DPOJobStatus) -> str:
    return next((c.message for c in status.conditions if c.type == ConditionType.READY), "")


def _apply_final(status: DPOJobStatus, final: TerminationMessage) -> None:
    """Fold the trainer's termination message (final metrics, model location) into the status."""
    if metrics := final.metrics:
        found = status_metrics(metrics)
        status.metrics = {**(status.metrics or {}), **found["metrics"]}
        if "rewards" in found:
            status.rewards = (status.rewards or Rewards()).model_copy(update=found["rewards"])
        if "evalRewards" in found:
            status.eval_rewards = (status.eval_rewards or Rewards()).model_copy(update=found["evalRewards"])
    if final.model is not None and (location := final.model.model_dump(exclude_none=True)):
        status.model = ModelLocation(**location)
    if final.stage is not None:
        status.stage = final.stage
    if status.phase == Phase.SUCCEEDED:
        status.stage = Stage.PUSH
        done = {"percent": 100, "eta_seconds": 0, "eta": "0s", "stage_eta_seconds": 0}
        status.progress = (status.progress or Progress()).model_copy(update=done)


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the DPOJob."""

    type: str  # Normal or Warning
    reason: str
    message: str


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """Events for what changed between two statuses: new run, stop rules that fired, stage, retries, phase."""
    events: list[Event] = []
    old_run, new_run = old.get("run"), new.get("run")
    if old_run and new_run and old_run != new_run:
        events.append(
            Event(
                "Normal",
                EventReason.NEW_RUN,
                f"training spec changed at generation {new_run['generation']}: starting a new run "
                f"(previous run {old.get('phase', 'unknown')} kept in status.runs)",
            )
        )
    same_run = old_run == new_run
    known = {(h.get("stage"), h.get("rule")) for h in (old.get("rules") or [])} if same_run else set()
    for hit in new.get("rules") or []:
        if (hit.get("stage"), hit.get("rule")) in known or hit.get("action") == "fail":  # fail: the Failed Event
            continue
        if hit.get("action") == "warn":
            events.append(Event("Warning", hit.get("reason") or Reason.METRIC_RULE, hit.get("message") or ""))
        else:
            events.append(Event("Normal", EventReason.STOPPED_EARLY, hit.get("message") or ""))
    events += _sft_model_events(old.get("sftModel") if same_run else None, new.get("sftModel"))
    if new.get("stage") and (not same_run or old.get("stage") != new.get("stage")):
        events.append(Event("Normal", EventReason.STAGE_STARTED, f"stage {new['stage']} started"))
    retries_before = old.get("retries", 0) if same_run else 0
    if new.get("retries", 0) > retries_before and new.get("phase") != Phase.FAILED:
        why = ((new.get("trainer") or {}).get("lastFailure") or "").strip()
        because = f" ({why})" if why else ""
        events.append(
            Event(
                "Warning",
                EventReason.RETRYING,
                f"trainer pod failed{because}, {new['retries']} so far; the Job retries it",
            )
        )
    old_phase = old.get("phase") if same_run else None
    phase = new.get("phase")
    reason = (_condition(new, ConditionType.READY) or {}).get("reason")
    if phase == Phase.PENDING and old_phase != Phase.SUSPENDED:
        # Waiting for a pod is routine; only problems (unschedulable, image pull, config) and waiting in a
        # Kueue queue (admission can take hours) deserve an Event.
        old_reason = (_condition(old, ConditionType.READY) or {}).get("reason") if same_run else None
        if reason in PENDING_EVENTS and reason != old_reason:
            events.append(_phase_event(new, old_phase))
    elif phase != old_phase:
        events.append(_phase_event(new, old_phase))
    return events


def _sft_model_events(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[Event]:
    """SFTReused when the run takes a shared SFT model, WaitingForSFT when it starts waiting for one."""
    if not new or (old or {}).get("source") == new.get("source"):
        return []
    message = new.get("message") or f"{new.get('source')} {new.get('digest')}"
    if new.get("source") == "reused":
        return [Event("Normal", EventReason.SFT_REUSED, f"SFT skipped: {message}")]
    if new.get("source") == "waiting":
        return [Event("Normal", Reason.WAITING_FOR_SFT, message)]
    return []


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)


PENDING_EVENTS = PENDING_WARNINGS | {Reason.QUEUED}
"""Reasons of a Pending DPOJob worth an Event (waiting for a pod to start is routine)."""


def _phase_event(status: dict[str, Any], old_phase: str | None) -> Event:
    phase = status["phase"]
    ready = _condition(status, ConditionType.READY) or {}
    if phase == Phase.SUCCEEDED:
        model = status.get("model") or {}
        where = model.get("commitUrl") or model.get("repoId") or model.get("directory") or "the output"
        return Event("Normal", Reason.SUCCEEDED, f"training finished; merged model at {where}")
    if phase == Phase.FAILED:
        return Event("Warning", ready.get("reason") or Phase.FAILED, ready.get("message") or "training failed")
    if phase == Phase.SUSPENDED:
        return Event("Normal", Reason.SUSPENDED, "suspended: trainer Job deleted; it resumes from its checkpoint")
    if old_phase == Phase.SUSPENDED:
        return Event("Normal", EventReason.RESUMED, "resumed: the trainer continues from its newest checkpoint")
    if phase == Phase.RUNNING:
        return Event("Normal", Reason.RUNNING, ready.get("message") or "trainer running")
    if ready.get("reason") == Reason.QUEUED:
        return Event("Normal", Reason.QUEUED, ready.get("message") or "waiting for Kueue admission")
    return Event("Warning", ready.get("reason") or Phase.PENDING, ready.get("message") or "waiting for the trainer")


def utc_from_rfc3339(value: str) -> datetime:
    """Parse a Kubernetes timestamp (fractional seconds allowed)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
