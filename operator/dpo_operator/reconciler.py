"""The reconcile loop: desired objects from the spec, applied idempotently, status computed and patched.

Level-triggered: whatever woke it (a DPOJob, Job or pod event, a trainer log line, the periodic resync), one
`reconcile(namespace, name)` looks at everything and converges. Calls for the same DPOJob are serialized.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from . import manifests
from .followers import LogFollowers
from .kube import Kube, merge_patch, prune_none
from .spec import DPOJobSpec, describe_validation_error
from .status import TERMINAL, Observed, compute_status, transition_events, utc_from_rfc3339

log = logging.getLogger(__name__)


@dataclass
class OperatorConfig:
    """Operator-wide settings (from the environment / Helm values)."""

    trainer_env: dict[str, str] = field(default_factory=dict)
    """Extra env for every trainer pod (e.g. HF_ENDPOINT for a Hub mirror, proxies)."""
    resync_seconds: float = 30.0
    """How often every DPOJob is re-examined (TTL expiry, missed events)."""


def validate_spec(raw: dict[str, Any]) -> tuple[DPOJobSpec | None, str | None]:
    """Deep validation beyond the CRD schema: cross-field rules and what a cluster run needs."""
    try:
        spec = DPOJobSpec.model_validate(raw)
    except ValidationError as exc:
        return None, describe_validation_error(exc)
    directory = spec.output.directory
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


def current_run(dpojob: dict[str, Any]) -> dict[str, Any]:
    """The run the spec asks for: kept while the training spec is unchanged, else a new one at this generation."""
    previous = (dpojob.get("status") or {}).get("run") or {}
    digest = manifests.spec_hash(dpojob["spec"])
    if previous.get("specHash") == digest:
        return previous
    return {"generation": dpojob["metadata"]["generation"], "specHash": digest}


class Reconciler:
    """Owns the per-DPOJob locks, the trainer log followers and the background loops."""

    def __init__(self, kube: Kube, config: OperatorConfig) -> None:
        self.kube = kube
        self.config = config
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_lock = threading.Condition()
        self._stopped = threading.Event()
        self.followers = LogFollowers(kube.core, self.mark_dirty)
        self._threads: list[threading.Thread] = []

    # --- background loops -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the flusher (reconciles what log followers marked) and the periodic resync."""
        for target, name in ((self._flush_loop, "dpo-flush"), (self._resync_loop, "dpo-resync")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopped.set()
        with self._dirty_lock:
            self._dirty_lock.notify_all()
        self.followers.stop_all()

    def mark_dirty(self, namespace: str, name: str) -> None:
        """Ask for a reconcile soon (coalesced): called by log followers on every progress event."""
        with self._dirty_lock:
            self._dirty.add((namespace, name))
            self._dirty_lock.notify()

    def _flush_loop(self) -> None:
        while not self._stopped.is_set():
            with self._dirty_lock:
                while not self._dirty and not self._stopped.is_set():
                    self._dirty_lock.wait()
                keys, self._dirty = self._dirty, set()
            for namespace, name in keys:
                self.reconcile_safely(namespace, name)
            self._stopped.wait(1.0)  # coalesce bursts of log lines into at most one patch per second

    def _resync_loop(self) -> None:
        while not self._stopped.wait(self.config.resync_seconds):
            try:
                items = self.kube.list_dpojobs()
            except ApiException as exc:
                log.warning("resync list failed: %s", exc.reason)
                continue
            for item in items:
                self.reconcile_safely(item["metadata"]["namespace"], item["metadata"]["name"])

    def reconcile_safely(self, namespace: str, name: str) -> None:
        """Reconcile, logging instead of raising (background callers have nobody to raise to)."""
        try:
            self.reconcile(namespace, name)
        except Exception:
            log.exception("reconcile of %s/%s failed; the next event or resync retries", namespace, name)

    # --- the loop -----------------------------------------------------------------------------------------
    def reconcile(self, namespace: str, name: str) -> None:
        """Converge one DPOJob. Retries once on a status write conflict."""
        with self._locks[(namespace, name)]:
            for attempt in range(3):
                try:
                    self._reconcile(namespace, name)
                    return
                except ApiException as exc:
                    if exc.status != 409 or attempt == 2:
                        raise

    def _reconcile(self, namespace: str, name: str) -> None:
        dpojob = self.kube.get_dpojob(namespace, name)
        if dpojob is None or dpojob["metadata"].get("deletionTimestamp"):
            self.followers.forget(namespace, name)
            return  # children go with it through ownerReferences
        old = dpojob.get("status") or {}
        spec, error = validate_spec(dpojob["spec"])
        run = current_run(dpojob)
        generation = run["generation"]
        job_name = manifests.run_name(name, generation)
        same_run = old.get("run") == run
        finished = same_run and old.get("phase") in TERMINAL and error is None
        suspended = bool(spec and spec.suspend) and not finished

        self._delete_superseded(namespace, name, generation)
        job = self.kube.get_job(namespace, job_name)
        if error is None and spec is not None and not finished:
            if suspended and job is not None:
                self.kube.delete("Job", namespace, job_name)
                job = None
            elif not suspended and job is None:
                job = self._create_run(dpojob, spec, generation)
        pods = self.kube.list_pods(namespace, f"{manifests.LABEL_DPOJOB}={name},{manifests.LABEL_RUN}={generation}")
        self.followers.ensure(namespace, name, pods)
        observed = Observed(
            generation=dpojob["metadata"]["generation"],
            run=run,
            spec_error=error,
            suspended=suspended,
            job=job,
            pods=pods,
            progress=self.followers.latest_progress(namespace, name, pods),
        )
        new = prune_none(compute_status(old, observed))
        if patch := merge_patch(old, new):
            self.kube.patch_status(dpojob, patch)
            for event in transition_events(old, new):
                self.kube.post_event(dpojob, event.type, event.reason, event.message)
        if finished and spec is not None:
            self._expire(dpojob, spec, job)

    def _create_run(self, dpojob: dict[str, Any], spec: DPOJobSpec, generation: int) -> dict[str, Any]:
        """ConfigMap then Job for this run; an existing one (operator restart, race) is adopted, never duplicated."""
        uid = dpojob["metadata"]["uid"]
        self.kube.create_or_adopt(manifests.build_config_map(dpojob, generation), uid)
        job, created = self.kube.create_or_adopt(
            manifests.build_job(dpojob, spec, generation, self.config.trainer_env), uid
        )
        if created:
            self.kube.post_event(
                dpojob, "Normal", "JobCreated", f"created trainer Job {job['metadata']['name']} (run {generation})"
            )
        return job

    def _delete_superseded(self, namespace: str, name: str, generation: int) -> None:
        """Stop runs of an older training spec: a changed spec means a new run (GitOps retraining)."""
        for job in self.kube.list_jobs(namespace, f"{manifests.LABEL_DPOJOB}={name}"):
            labels = job["metadata"].get("labels") or {}
            if labels.get(manifests.LABEL_RUN) != str(generation):
                self.kube.delete("Job", namespace, job["metadata"]["name"])
                self.kube.delete("ConfigMap", namespace, job["metadata"]["name"])

    def _expire(self, dpojob: dict[str, Any], spec: DPOJobSpec, job: dict[str, Any] | None) -> None:
        """ttlSecondsAfterFinished: delete the finished Job and ConfigMap, never the DPOJob (GitOps-safe)."""
        ttl = spec.runtime.ttl_seconds_after_finished
        completed = (dpojob.get("status") or {}).get("completionTime")
        if ttl is None or job is None or not completed:
            return
        if datetime.now(UTC) >= utc_from_rfc3339(completed) + timedelta(seconds=ttl):
            meta = dpojob["metadata"]
            self.kube.delete("Job", meta["namespace"], job["metadata"]["name"])
            self.kube.delete("ConfigMap", meta["namespace"], job["metadata"]["name"])
            self.kube.post_event(
                dpojob, "Normal", "Cleaned", f"deleted trainer Job {job['metadata']['name']} after {ttl}s TTL"
            )
