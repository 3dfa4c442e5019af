"""The reconcile loop: desired objects from the spec, applied idempotently, status computed and patched.

Level-triggered: whatever woke it (a DPOJob, Job or pod event, a trainer log line, the periodic resync), one
`reconcile(namespace, name)` looks at everything and converges. Calls for the same DPOJob are serialized.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from dpojob_api.spec import DPOJobSpec, describe_validation_error, legacy_spec_hash, spec_hash
from dpojob_api.status import run_identity
from dpojob_api.vocabulary import FINISHED_POD_PHASES, EventReason, JobConditionType, Phase

from . import manifests, metrics
from .cache import Key, ObjectCache, slim
from .followers import LogFollowers
from .health import Health
from .kube import (
    ChildRejectedError,
    Kube,
    NotOwnedError,
    merge_patch,
    owned_by,
    prune_none,
)
from .logs import about
from .settings import OperatorSettings
from .status import (
    Observed,
    compute_status,
    job_condition,
    run_finished,
    trainer_started,
    transition_events,
    utc_from_rfc3339,
)
from .workqueue import EventPoster, Resync, Workers, WorkQueue

log = logging.getLogger(__name__)


def validate_spec(raw: dict[str, Any]) -> tuple[DPOJobSpec | None, str | None]:
    """Deep validation beyond the CRD schema: cross-field rules and what a cluster run needs."""
    try:
        spec = DPOJobSpec.model_validate(raw)
    except ValidationError as exc:
        return None, describe_validation_error(exc)
    checkpoints = manifests.normalized_path(spec.checkpointing.directory)
    if not spec.checkpointing.directory.startswith("/") or checkpoints in manifests.RESERVED_PATHS:
        return spec, (
            f"spec.checkpointing.directory: {spec.checkpointing.directory!r} must be an absolute path other than "
            f"{', '.join(sorted(manifests.RESERVED_PATHS))} (the trainer pod mounts its work volume there)"
        )
    if spec.runtime.checkpoint_volume is not None and spec.runtime.checkpoint_volume.read_only:
        return spec, (
            "spec.runtime.checkpointVolume.readOnly: the trainer writes its work directory and checkpoints on that "
            "volume; mount it read-write"
        )
    directory = spec.output.directory
    if directory is not None and not manifests.on_writable_volume(spec, directory):
        # Refused even with output.hub set: the trainer copies the model there, and fails there, after the training.
        return spec, (
            f"spec.output.directory: {directory!r} is not on a writable volume of the trainer pod (its root "
            f"filesystem is read-only; writable: {', '.join(manifests.writable_mounts(spec))}); put it under "
            f"{manifests.OUTPUT_MOUNT}/ with spec.runtime.outputVolume (not readOnly) to keep the model, or leave "
            "output.directory out and push with spec.output.hub"
        )
    if spec.output.hub is None and directory is not None:
        on_volume = (spec.runtime.output_volume and directory.startswith(manifests.OUTPUT_MOUNT + "/")) or (
            spec.runtime.checkpoint_volume and directory.startswith(spec.checkpointing.directory.rstrip("/") + "/")
        )
        if not on_volume:
            return spec, (
                f"spec.output.directory: {directory!r} is not on a persistent volume, so the model would be lost "
                f"with the pod; set spec.runtime.outputVolume and a path under {manifests.OUTPUT_MOUNT}/, or "
                "spec.output.hub"
            )
    return spec, None


RETRY_ANNOTATION = f"{manifests.API_GROUP}/retry"
"""Set to a new value (e.g. `kubectl annotate dpo NAME dpo-operator.io/retry=$(date +%s) --overwrite`) to run
a Failed run again without editing the spec; the retry resumes from the run's checkpoints when they persist."""


def current_run(dpojob: dict[str, Any]) -> dict[str, Any]:
    """The run the spec asks for: kept while what decides the model is unchanged (spec.model_identity), else a
    new one at this generation. A Failed run whose retry annotation holds a value it has not seen is tried again
    as the next attempt of the same run."""
    status = dpojob.get("status") or {}
    previous = run_identity(status)
    spec = dpojob["spec"]
    digest = spec_hash(spec)
    retry = (dpojob["metadata"].get("annotations") or {}).get(RETRY_ANNOTATION)
    if previous.get("specHash") not in (digest, legacy_spec_hash(spec)):
        return {"generation": dpojob["metadata"]["generation"], "specHash": digest, "retryToken": retry}
    if retry and retry != previous.get("retryToken") and status.get("phase") == Phase.FAILED:
        return {**previous, "attempt": previous.get("attempt", 0) + 1, "retryToken": retry}
    return previous


POD_CREATION_GRACE = timedelta(seconds=10)
STUCK_TERMINATING = timedelta(minutes=5)
"""How long past its deletion deadline a pod is still waited for; after that its node is taken to be lost."""


def stopping_pod(pods: list[dict[str, Any]], dpojob_name: str, now: datetime) -> dict[str, Any] | None:
    """A pod of an earlier run or attempt of this DPOJob that is still stopping: a new pod must wait for it, or two
    trainers would write the same checkpoints (runs that train the same share a work directory) and hold two
    GPUs. Only pods whose controller is a Job named as one of the DPOJob's runs count (any pod can carry our
    labels), and a pod still there STUCK_TERMINATING past its deletion deadline (a lost node) does not."""
    for pod in pods:
        if pod.get("status", {}).get("phase") in FINISHED_POD_PHASES:
            continue
        owners = pod["metadata"].get("ownerReferences") or []
        if not any(
            o.get("kind") == "Job" and o.get("controller") and manifests.runs_job(dpojob_name, o.get("name", ""))
            for o in owners
        ):
            continue
        deadline = pod["metadata"].get("deletionTimestamp")
        if deadline and now > utc_from_rfc3339(deadline) + STUCK_TERMINATING:
            log.warning("pod %s is stuck terminating (lost node?); not waiting for it", pod["metadata"]["name"])
            continue
        return pod
    return None


class PodCreationErrors:
    """Why Jobs have no pod yet, from one listing of a namespace's FailedCreate Events (Kube.failed_creates)
    shared by all its Jobs and taken again at most every REFRESH_S. Under a burst the Job controller creates
    pods at its own request rate, so thousands of Jobs wait for their pod past POD_CREATION_GRACE together: a
    LIST per Job and reconcile, each filtering every Event of the namespace, was quadratic work for the API
    server, and the status writes waited behind it."""

    REFRESH_S = 5.0

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._namespace_locks: dict[str, threading.Lock] = {}
        """One listing at a time per namespace: the workers that need it meanwhile wait and share it."""
        self._listings: dict[str, tuple[datetime, dict[str, str]]] = {}
        """Namespace → when its listing was taken, and its FailedCreate messages by involved object uid."""

    def lookup(self, job: dict[str, Any]) -> tuple[str | None, float]:
        """The Job's FailedCreate message (or None) from a listing taken after its POD_CREATION_GRACE ended, and
        0; or None and the seconds until a listing may be taken again, when the newest one is older than that."""
        meta = job["metadata"]
        namespace = meta["namespace"]
        grace_ended = utc_from_rfc3339(meta["creationTimestamp"]) + POD_CREATION_GRACE
        with self._lock:
            namespace_lock = self._namespace_locks.setdefault(namespace, threading.Lock())
        with namespace_lock:
            taken, messages = self._listings.get(namespace, (None, {}))
            now = datetime.now(UTC)
            if taken is None or taken < grace_ended:
                if taken is not None and (since := (now - taken).total_seconds()) < self.REFRESH_S:
                    return None, self.REFRESH_S - since
                messages = self.kube.failed_creates(namespace)
                self._listings[namespace] = (now, messages)
        return messages.get(meta["uid"]), 0.0


class Reconciler:
    """Converges DPOJobs, reading the cluster from the ObjectCache; owns the trainer log followers.

    Its threads and what they share are described in workqueue.py."""

    def __init__(
        self,
        kube: Kube,
        cache: ObjectCache,
        queue: WorkQueue,
        settings: OperatorSettings,
        health: Health,
        features: manifests.ServerFeatures,
    ) -> None:
        self.kube = kube
        self.cache = cache
        self.queue = queue
        self.settings = settings
        self.health = health
        self.features = features
        self._rejected: dict[Key, tuple[int, float, ChildRejectedError]] = {}
        """Per DPOJob: the metadata.generation whose children the API server refused, when, and why. A 400/422
        (the spec is wrong) is not sent again until the spec changes; another 4xx (quota, RBAC, an admission
        policy: the cluster may change) at most once per resync period."""
        self._created: dict[Key, str] = {}
        """Per DPOJob: the UID of the Job this process created for its run while the status write that records it
        (status.internal.jobUid) has not happened yet: under a burst it waits behind other DPOJobs' Jobs."""
        self.phases: dict[Key, str] = {}
        """Each known DPOJob's phase as last written (the dpo_operator_dpojobs gauge)."""
        self.followers = LogFollowers(kube, self.mark_dirty)
        self._collector = metrics.StateCollector(
            lambda: list(self.phases.values()), self.followers.active, queue.depths
        )
        self.events = EventPoster(kube.post_event, health, busy=queue.urgent_waiting)
        self.pod_creation_errors = PodCreationErrors(kube)
        self._loops = (
            Workers(queue, lambda key: self.reconcile_safely(*key), settings.workers, health),
            Resync(queue, cache, self.relist, settings.resync_seconds, health),
            self.events,
        )

    def start(self) -> None:
        """Start the workers and the periodic resync (see workqueue.py)."""
        metrics.REGISTRY.register(self._collector)
        for loop in self._loops:
            loop.start()

    def stop(self) -> None:
        for loop in self._loops:
            loop.stop()
        self.followers.stop_all()
        metrics.REGISTRY.unregister(self._collector)

    def forget(self, namespace: str, name: str) -> None:
        """A DPOJob was deleted: stop following its pods, drop its metric series."""
        self.followers.forget(namespace, name)
        self._rejected.pop((namespace, name), None)
        self._created.pop((namespace, name), None)
        self.phases.pop((namespace, name), None)
        metrics.forget_dpojob(namespace, name)

    def mark_dirty(self, namespace: str, name: str) -> None:
        """Reconcile soon: log followers call this on every progress event; the delay coalesces a burst of
        lines into one status patch per second."""
        self.queue.add_after((namespace, name), 1.0)

    def relist(self) -> None:
        """Replace the cache with fresh LISTs (see ObjectCache.replace_all). A DPOJob the watch had not reported
        deleted is forgotten as a DELETED event would have it (main.dpojob_event)."""
        for kind in ("DPOJob", "Job", "Pod"):
            items, revision = self.kube.list_all(kind, self.settings.namespaces, keep=partial(self.cache.listed, kind))
            if dropped := self.cache.replace_all(kind, items, revision):
                log.warning("relist: %d %s(s) the watch had not reported deleted were dropped", len(dropped), kind)
            if kind == "DPOJob":
                for namespace, name in dropped:
                    self.forget(namespace, name)

    def reconcile_safely(self, namespace: str, name: str) -> None:
        """Reconcile, logging instead of raising (background callers have nobody to raise to)."""
        metrics.RECONCILES.inc()
        started = time.monotonic()
        try:
            self.reconcile(namespace, name)
        except Exception:
            metrics.RECONCILE_ERRORS.inc()
            log.exception(
                "reconcile of %s/%s failed; the next event or resync retries",
                namespace,
                name,
                extra=about(namespace, name),
            )
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)

    # --- the loop -----------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> None:
        """Converge one DPOJob. A status write conflict (the cached DPOJob was stale: someone changed it
        meanwhile) re-reads it from the API server and retries."""
        for attempt in range(3):
            try:
                self._reconcile(namespace, name)
                return
            except ApiException as exc:
                if exc.status != 409 or attempt == 2:
                    raise
                fresh = self.kube.get_dpojob(namespace, name)
                if fresh is None:
                    self.cache.remove("DPOJob", namespace, name)
                    return
                self.cache.put(fresh)

    def _reconcile(self, namespace: str, name: str) -> None:
        dpojob = self.cache.dpojob(namespace, name)
        if dpojob is None or dpojob["metadata"].get("deletionTimestamp"):
            self.followers.forget(namespace, name)
            return  # children go with it through ownerReferences
        uid = dpojob["metadata"]["uid"]
        old = dpojob.get("status") or {}
        spec, error = validate_spec(dpojob["spec"])
        run = prune_none(current_run(dpojob))
        generation, attempt = run["generation"], run.get("attempt", 0)
        # A finished run stays finished, even if a runtime edit or a stricter operator now finds the spec invalid.
        finished = run_finished(old, run)
        observed = Observed(
            generation=dpojob["metadata"]["generation"],
            run=run,
            spec_error=error,
            suspended=bool(spec and spec.suspend) and not finished,
        )
        if old.get("run") and run_identity(old) != run:
            # Record a run that replaces another before creating anything for it: its Job is named after
            # run.generation, which must not drift if the spec changes again (or the operator dies) before the Job
            # exists. Then go on from what the API server answered (no round trip through the watch). A first
            # run is recorded with its Job, in one write: should the operator die in between and the spec change
            # meanwhile, the next reconcile supersedes that Job, which had run for moments at most.
            dpojob = self._write_status(dpojob, old, observed)
            old = dpojob.get("status") or {}

        job_name = manifests.run_name(name, generation, attempt)
        job = self._current_job(namespace, name, uid, job_name)
        if job is not None and not self.trusted(dpojob, job):
            if not finished:  # a finished run's status is final; a Job of it not recorded (0.1.x) stays
                self._replace_untrusted(dpojob, job)
            job = None
        pods = self.cache.pods(namespace, manifests.label_value(name), generation)
        if error is None and spec is not None and not finished:
            if job is not None and not observed.suspended and self._outdated(dpojob, spec, job, pods, attempt):
                self._delete_child(job, uid)
                self.events.post(
                    dpojob,
                    "Normal",
                    EventReason.JOB_REPLACED,
                    f"the spec changed before training started: trainer Job {job_name} is re-created with it",
                )
                job = None
            if observed.suspended and job is not None:
                self._delete_child(job, uid)
                job = None
            elif not observed.suspended and job is None:
                every_run = self.cache.pods(namespace, manifests.label_value(name))
                stopping = stopping_pod(every_run, name, datetime.now(UTC))
                rejected = self._rejected.get((namespace, name))
                if observed.not_owned:
                    pass  # a Job of this name exists; creating would only be refused
                elif stopping is not None:
                    observed.waiting = (
                        f"previous trainer pod {stopping['metadata']['name']} is still stopping; if its node is "
                        f"gone, `kubectl delete pod {stopping['metadata']['name']} --force` ends the wait (it ends "
                        f"by itself {STUCK_TERMINATING.seconds // 60} min past the pod's deletion deadline)"
                    )
                elif rejected is not None and self._still_refused(rejected, dpojob["metadata"]["generation"]):
                    observed.rejected = (rejected[2].code, str(rejected[2]))
                else:
                    try:
                        job = self._create_run(dpojob, spec, generation, attempt)
                        if job is not None and self.queue.urgent_waiting():
                            # Other DPOJobs still wait for their Job: those first, this status write after them
                            # (the next reconcile, in the normal lane). Without a burst it happens at once.
                            self.queue.add((namespace, name))
                            return
                    except NotOwnedError as exc:
                        observed.not_owned = str(exc)
                    except ChildRejectedError as exc:
                        log.warning("%s/%s: %s", namespace, name, exc, extra=about(namespace, name))
                        self._rejected[(namespace, name)] = (dpojob["metadata"]["generation"], time.monotonic(), exc)
                        observed.rejected = (exc.code, str(exc))
        observed.job = job
        observed.pods = [p for p in pods if job is not None and owned_by(p, job["metadata"]["uid"])]
        if job is not None and not observed.pods and not finished and not (job.get("spec") or {}).get("suspend"):
            observed.pod_creation_error = self._pod_creation_error(job)
        self.followers.ensure(namespace, name, observed.pods)
        observed.progress = self.followers.latest_progress(namespace, observed.pods)
        dpojob = self._write_status(dpojob, old, observed)
        if job is not None and self._created.get((namespace, name)) == job["metadata"]["uid"]:
            del self._created[(namespace, name)]  # recorded in the status now
        if (
            job is not None
            and observed.spec_error is None
            and (dpojob.get("status") or {}).get("phase") == Phase.FAILED
        ):
            self._stop(job)
        if finished and spec is not None:
            self._expire(dpojob, spec, job)

    def trusted(self, dpojob: dict[str, Any], job: dict[str, Any]) -> bool:
        """Whether `job` (named as the run, naming this DPOJob as controller) is the Job the operator created for the
        run: its UID, assigned by the API server, is the one the status records (status.internal.jobUid) or the one
        this process has just created. Nothing else decides: labels, annotations, the ownerReference and the pod
        template can all be copied onto another Job, and admission webhooks change the content of ours."""
        job_uid = job["metadata"]["uid"]
        recorded = ((dpojob.get("status") or {}).get("internal") or {}).get("jobUid")
        return job_uid in (recorded, self._created.get(_key(dpojob)))

    def _outdated(
        self, dpojob: dict[str, Any], spec: DPOJobSpec, job: dict[str, Any], pods: list[dict[str, Any]], attempt: int
    ) -> bool:
        """The spec changed since the run's Job was created, and no trainer of it has started yet (a wrong image,
        an unschedulable request, a missing Secret): the Job is out of date and nothing is lost by replacing it.
        Once a trainer has started, the Job is kept (a runtime edit applies from the next run or a resume)."""
        annotations = job["metadata"].get("annotations") or {}
        if annotations.get(manifests.SPEC_GENERATION_ANNOTATION) == str(dpojob["metadata"]["generation"]):
            return False
        if any(trainer_started(p) for p in pods if owned_by(p, job["metadata"]["uid"])):
            return False
        desired = self._job_manifest(dpojob, spec, int(job["metadata"]["labels"][manifests.LABEL_RUN]), attempt)
        return (
            annotations.get(manifests.TEMPLATE_ANNOTATION)
            != desired["metadata"]["annotations"][manifests.TEMPLATE_ANNOTATION]
        )

    def _stop(self, job: dict[str, Any]) -> None:
        """The run failed in a way the same spec meets again (status.fails_at_once), on a server without
        podFailurePolicy: stop the Job from starting another pod (parallelism 0, its pods kept for their logs)."""
        job_spec = job.get("spec") or {}
        ended = job_condition(job, JobConditionType.COMPLETE) or job_condition(job, JobConditionType.FAILED)
        if ended or job_spec.get("parallelism") == 0:
            return
        stopped = slim({"kind": "Job", **self.kube.patch(job, {"spec": {"parallelism": 0}})})
        self.cache.put(stopped)

    def _pod_creation_error(self, job: dict[str, Any]) -> str | None:
        """Why the Job has no pod yet (its FailedCreate Event), looked up only once the Job is POD_CREATION_GRACE
        old: a new Job has no pod for a moment. A Job whose answer is not known yet (too young, or the namespace's
        listing was taken before its grace ended) is looked at again when it can be."""
        age = datetime.now(UTC) - utc_from_rfc3339(job["metadata"]["creationTimestamp"])
        if age < POD_CREATION_GRACE:
            self._look_again(job, (POD_CREATION_GRACE - age).total_seconds())
            return None
        message, retry_in = self.pod_creation_errors.lookup(job)
        if retry_in:
            self._look_again(job, retry_in)
        return message

    def _look_again(self, job: dict[str, Any], delay: float) -> None:
        meta = job["metadata"]
        dpojob = (meta.get("annotations") or {}).get(manifests.ANNOTATION_DPOJOB)
        if dpojob:
            self.queue.add_after((meta["namespace"], dpojob), delay + 0.5)

    def _write_status(self, dpojob: dict[str, Any], old: dict[str, Any], observed: Observed) -> dict[str, Any]:
        """Patch the status if it changed, then post the Events its transitions deserve. Returns the DPOJob as
        it now is."""
        new = compute_status(old, observed).to_document()
        meta = dpojob["metadata"]
        self.phases[(meta["namespace"], meta["name"])] = new.get("phase", Phase.PENDING)
        metrics.record_rewards(meta["namespace"], meta["name"], new.get("rewards") or {})
        if patch := merge_patch(old, new):
            with metrics.STATUS_PATCH_SECONDS.time():
                dpojob = self.kube.patch_status(dpojob, patch)
            self.cache.put(dpojob)
            for event in transition_events(old, new):
                self.events.post(dpojob, event.type, event.reason, event.message)
        return dpojob

    def _create_run(
        self, dpojob: dict[str, Any], spec: DPOJobSpec, generation: int, attempt: int
    ) -> dict[str, Any] | None:
        """ConfigMap then Job for this run; the Job's UID is trusted from here on (`trusted`). An existing Job of the
        name is adopted if it is the one the operator created (a race with the cache), else deleted (None: the next
        reconcile creates)."""
        uid = dpojob["metadata"]["uid"]
        self.kube.create_or_adopt(manifests.build_config_map(dpojob, generation, attempt), uid)
        job_manifest = self._job_manifest(dpojob, spec, generation, attempt)
        job, created = self.kube.create_or_adopt(job_manifest, uid)
        job = {"kind": "Job", **job}
        if created:
            self._created[_key(dpojob)] = job["metadata"]["uid"]
        elif not self.trusted(dpojob, job):
            self._replace_untrusted(dpojob, job)
            self.queue.add_after((dpojob["metadata"]["namespace"], dpojob["metadata"]["name"]), 1.0)
            return None
        job = slim(job)
        self.cache.put(job)
        if created:
            metrics.JOBS_CREATED.inc()
            if not (dpojob.get("status") or {}).get("runs"):  # the DPOJob's first run
                delay = utc_from_rfc3339(job["metadata"]["creationTimestamp"]) - utc_from_rfc3339(
                    dpojob["metadata"]["creationTimestamp"]
                )
                metrics.JOB_CREATION_DELAY.observe(max(delay.total_seconds(), 0.0))
            self.events.post(
                dpojob,
                "Normal",
                EventReason.JOB_CREATED,
                f"created trainer Job {job['metadata']['name']} (run {generation})",
            )
            if manifests.queue_name(dpojob) and spec.runtime.checkpoint_volume is None:
                self.events.post(
                    dpojob,
                    "Warning",
                    EventReason.PREEMPTION_RESTARTS_TRAINING,
                    f"queued in Kueue queue {manifests.queue_name(dpojob)} without spec.runtime.checkpointVolume: "
                    "if Kueue preempts the run, training starts again from the beginning",
                )
        return job

    def _still_refused(self, rejected: tuple[int, float, ChildRejectedError], generation: int) -> bool:
        """Whether a refusal still stands without asking the API server again (see _rejected)."""
        refused_generation, when, error = rejected
        if refused_generation != generation:
            return False
        return error.code in (400, 422) or time.monotonic() - when < self.settings.resync_seconds

    def _job_manifest(self, dpojob: dict[str, Any], spec: DPOJobSpec, generation: int, attempt: int) -> dict[str, Any]:
        return manifests.build_job(
            dpojob,
            spec,
            generation,
            self.settings.trainer_env,
            attempt=attempt,
            features=self.features,
            default_cache_claim=self.settings.trainer_cache_claim,
            defaults=self.settings.trainer_defaults,
        )

    def _current_job(self, namespace: str, name: str, uid: str, current: str) -> dict[str, Any] | None:
        """This run's Job (named `current`) if we own it; our other Jobs belong to superseded runs (a changed
        spec, a retried attempt) and are deleted.

        A same-named Job we do not own (left by a deleted DPOJob of this name) is never adopted; creating
        the run then reports why it waits.
        """
        found = None
        for job in self.cache.jobs(namespace, manifests.label_value(name)):
            if not owned_by(job, uid):
                continue
            if job["metadata"]["name"] == current:
                found = job
            else:
                self._delete_child(job, uid)
        return found

    def _replace_untrusted(self, dpojob: dict[str, Any], job: dict[str, Any]) -> None:
        """A Job named as the run and naming this DPOJob as controller that the operator does not trust (`trusted`):
        made by someone else, or the operator's own when it stopped before its status recorded it. Either way it is
        not the run: delete it (this very one, by UID) so that the operator's own is created."""
        name = job["metadata"]["name"]
        log.warning(
            "%s/%s: Job %s is not the one the operator created; deleting it",
            *_key(dpojob),
            name,
            extra=about(*_key(dpojob)),
        )
        self._delete_child(job, dpojob["metadata"]["uid"])
        self.events.post(
            dpojob,
            "Warning",
            EventReason.UNTRUSTED_JOB,
            f"Job {name} names this DPOJob as its controller but the operator did not create it (or stopped before "
            "recording it): deleted; the run's Job is created again",
        )

    def _delete_child(self, job: dict[str, Any], uid: str) -> None:
        """Delete a run's Job (this one, by UID) and its same-named ConfigMap if this DPOJob (`uid`) controls that
        too, and stop holding the Job as if it still ran. A ConfigMap of that name can be anyone's: names are
        predictable."""
        meta = job["metadata"]
        self.kube.delete("Job", meta["namespace"], meta["name"], uid=meta["uid"])
        config_map = self.kube.get("ConfigMap", meta["namespace"], meta["name"])
        if config_map is not None and owned_by(config_map, uid):
            self.kube.delete("ConfigMap", meta["namespace"], meta["name"], uid=config_map["metadata"]["uid"])
        self.cache.remove("Job", meta["namespace"], meta["name"], meta.get("labels"))

    def _expire(self, dpojob: dict[str, Any], spec: DPOJobSpec, job: dict[str, Any] | None) -> None:
        """ttlSecondsAfterFinished: delete the finished Job and ConfigMap, never the DPOJob (GitOps-safe)."""
        ttl = spec.runtime.ttl_seconds_after_finished
        completed = (dpojob.get("status") or {}).get("completionTime")
        if ttl is None or job is None or not completed:
            return
        if datetime.now(UTC) >= utc_from_rfc3339(completed) + timedelta(seconds=ttl):
            self._delete_child(job, dpojob["metadata"]["uid"])
            self.events.post(
                dpojob, "Normal", EventReason.CLEANED, f"deleted trainer Job {job['metadata']['name']} after {ttl}s TTL"
            )


def _key(dpojob: dict[str, Any]) -> Key:
    return dpojob["metadata"]["namespace"], dpojob["metadata"]["name"]
