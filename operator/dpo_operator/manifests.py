"""Build the trainer's Kubernetes objects from a DPOJob. Pure functions: spec in, manifest dicts out.

Names are deterministic (DPOJob name + run generation), so re-creating after an operator restart hits
409 and the existing object is adopted instead of duplicated.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml
from kubernetes.utils import parse_quantity

from dpojob_api.progress import SPEC_DIGEST_ENV, TERMINATION_MESSAGE_PATH, TERMINATION_PATH_ENV
from dpojob_api.spec import (
    API_GROUP,
    API_VERSION,
    KIND,
    DPOJobSpec,
    RuntimeSpec,
    VolumeClaim,
    digest,
    training_hash,
)
from dpojob_api.vocabulary import FAIL_AT_ONCE_EXIT_CODES

if TYPE_CHECKING:
    from .settings import TrainerDefaults

CONFIG_MOUNT = "/etc/dpo-operator"
SPEC_FILE = "dpojob.yaml"
DATA_MOUNT = "/data"
OUTPUT_MOUNT = "/output"
CACHE_MOUNT = "/cache"
SCRATCH_MOUNT = "/tmp"
RESERVED_PATHS = frozenset(
    {"/", SCRATCH_MOUNT, "/dev", "/dev/shm", "/proc", "/sys", CONFIG_MOUNT, DATA_MOUNT, OUTPUT_MOUNT, CACHE_MOUNT}
)
"""Paths the trainer pod mounts something else at (or must not hide): not a place for the work volume."""
CONTAINER = "trainer"
LABEL_DPOJOB = f"{API_GROUP}/dpojob"
LABEL_RUN = f"{API_GROUP}/run-generation"
ANNOTATION_DPOJOB = f"{API_GROUP}/dpojob-name"
"""The owning DPOJob's full name on every child (a label value holds at most 63 characters, a name 253)."""
SPEC_GENERATION_ANNOTATION = f"{API_GROUP}/spec-generation"
"""On a trainer Job: the DPOJob's metadata.generation it was built from (a later one may need another Job)."""
TEMPLATE_ANNOTATION = f"{API_GROUP}/template-hash"
"""On a trainer Job: the digest of its spec as the operator built it, before any admission webhook changed it
(whether the spec changed since: Reconciler._outdated)."""
MANAGED_BY = "dpo-operator"
# On SIGTERM (suspend, preemption, deletion) the trainer saves a checkpoint before exiting; torchrun alone waits
# 30 s for its workers. Give the save time before the kubelet's SIGKILL.
TERMINATION_GRACE_SECONDS = 120
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_LABELS = (KUEUE_QUEUE_LABEL, "kueue.x-k8s.io/priority-class")
"""DPOJob labels copied to the trainer Job: Kueue manages a plain batch/v1 Job that carries them."""
_NAME_LIMIT = 52  # Job names feed pod names and the job-name label (63) plus the Job's 5-char pod suffix.
HF_HOME_ON_SCRATCH = f"{SCRATCH_MOUNT}/hf-home"
HF_HOME_ON_CACHE = f"{CACHE_MOUNT}/huggingface"
SCRATCH_SIZE_WITH_HF_HOME = "50Gi"
"""Default scratch size while /tmp holds the Hugging Face cache: a 7B model (13.5 GB) and the dataset files."""
SCRATCH_SIZE = "10Gi"
"""Default scratch size with a cache volume: HOME, compiler caches, temporary files."""
LOG_ALLOWANCE = "1Gi"
"""Ephemeral storage beyond the emptyDirs: the container's log files (the root filesystem is read-only)."""


@dataclass(frozen=True)
class ServerFeatures:
    """What the API server's version allows; newer fields are only sent where they exist (1.20 drops them)."""

    pod_failure_policy: bool = False
    """Job podFailurePolicy (on by default from 1.26): preemptions then cost no retry."""
    job_suspend: bool = False
    """Job spec.suspend (1.21+): Jobs for a Kueue queue are created suspended, for Kueue to admit."""


def run_name(dpojob_name: str, generation: int, attempt: int = 0) -> str:
    """Deterministic name of one run's Job and ConfigMap, short enough for pod names and labels.

    attempt > 0: a retry of a failed run (the dpo-operator.io/retry annotation), as a Job of its own.
    """
    suffix = f"-g{generation}" + (f"-r{attempt}" if attempt else "")
    if len(dpojob_name) + len(suffix) <= _NAME_LIMIT:
        return dpojob_name + suffix
    short = hashlib.sha256(dpojob_name.encode()).hexdigest()[:6]
    return f"{dpojob_name[: _NAME_LIMIT - len(suffix) - 7].rstrip('-.')}-{short}{suffix}"


def work_directory(spec: DPOJobSpec, dpojob_name: str) -> str:
    """The run's work directory, named by what it trains (spec.training_hash): every attempt of a run (a retry)
    and every later run that trains the same (an output-only edit) works there, so the trainer skips the stages
    that are done and resumes the running one from its checkpoint, on a checkpointVolume (an emptyDir starts empty
    anyway). Which stages run again is the trainer's per-stage fingerprints' decision alone."""
    return posixpath.join(spec.checkpointing.directory, f"{dpojob_name}-{training_hash(spec)[:12]}")


SFT_CACHE_DIRECTORY = "sft-cache"
"""Under checkpointing.directory on a checkpointVolume: the merged SFT models DPOJobs share (dpo_trainer.sft_cache).
No work directory can take the name: theirs end in a hex hash."""


def sft_cache_directory(spec: DPOJobSpec) -> str | None:
    """Where the trainer shares merged SFT models with the other DPOJobs on the same checkpointVolume (`--sft-cache`),
    or None: SFT off, sft.reuse false, or no checkpointVolume (an emptyDir is the pod's alone)."""
    if spec.runtime.checkpoint_volume is None or not spec.sft.enabled or not spec.sft.reuse:
        return None
    return posixpath.join(spec.checkpointing.directory, SFT_CACHE_DIRECTORY)


_JOB_SUFFIX = re.compile(r"-g([0-9]+)(?:-r([0-9]+))?$")


def runs_job(dpojob_name: str, job_name: str) -> bool:
    """Whether job_name is the name of one of this DPOJob's runs or attempts (run_name of some generation and
    attempt), whichever generation: pods of such Jobs share the DPOJob's work directories."""
    match = _JOB_SUFFIX.search(job_name)
    return match is not None and job_name == run_name(dpojob_name, int(match[1]), int(match[2] or 0))


def label_value(dpojob_name: str) -> str:
    """The DPOJob's name as a label value: names over 63 characters are shortened uniquely (a hash suffix)."""
    if len(dpojob_name) <= 63:
        return dpojob_name
    short = hashlib.sha256(dpojob_name.encode()).hexdigest()[:8]
    return f"{dpojob_name[:54].rstrip('-.')}-{short}"


def normalized_path(path: str) -> str:
    """An absolute path as the kernel resolves it, for comparing with RESERVED_PATHS: `/data/`, `/tmp/../data` and
    `//data` are `/data` (POSIX lets normpath keep a leading `//`; Linux reads it as `/`)."""
    normal = posixpath.normpath(path)
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def labels(dpojob_name: str, generation: int) -> dict[str, str]:
    """Labels on every child: the operator finds its objects by these (selectors use label_value too)."""
    return {
        "app.kubernetes.io/name": "dpo-trainer",
        "app.kubernetes.io/instance": label_value(dpojob_name),
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_DPOJOB: label_value(dpojob_name),
        LABEL_RUN: str(generation),
    }


OWN_LABEL_KEYS = frozenset(
    [
        *labels("x", 0),
        "job-name",
        "controller-uid",
        "batch.kubernetes.io/job-name",
        "batch.kubernetes.io/controller-uid",
    ]
)
"""Labels of a trainer pod that only the operator (its selectors) and the Job controller set: no default may."""
OWN_ANNOTATION_KEYS = frozenset({ANNOTATION_DPOJOB})


def runtime_with_defaults(dpojob: dict[str, Any], spec: DPOJobSpec, defaults: TrainerDefaults | None) -> RuntimeSpec:
    """spec.runtime with the cluster-wide defaults filled in where the DPOJob, as written, sets nothing.

    Whether it sets a field is read from the document (a key present and not null), not from the model: the model
    fills in the API's own defaults (its image), which must lose to the cluster's. A field set to an empty list or
    map (`tolerations: []`) is set: that DPOJob opts out of the default."""
    runtime = spec.runtime
    if defaults is None:
        return runtime
    written = (dpojob.get("spec") or {}).get("runtime") or {}
    fields = RuntimeSpec.model_fields
    wanted: dict[str, Any] = {
        "image": defaults.image.reference(),
        "image_pull_policy": defaults.image.pull_policy or None,
        "image_pull_secrets": defaults.image_pull_secrets or None,
        "tolerations": defaults.tolerations or None,
        "node_selector": defaults.node_selector or None,
        "affinity": defaults.affinity or None,
        "priority_class_name": defaults.priority_class_name,
    }
    update = {
        name: value
        for name, value in wanted.items()
        if value is not None and written.get(fields[name].alias or name) is None and written.get(name) is None
    }
    return runtime.model_copy(update=update) if update else runtime


def child_metadata(dpojob: dict[str, Any], name: str, generation: int) -> dict[str, Any]:
    """Metadata of a run's ConfigMap and Job: deterministic name, labels, the owner's name, owner reference."""
    meta = dpojob["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"], generation),
        "annotations": {ANNOTATION_DPOJOB: meta["name"]},
        "ownerReferences": [owner_reference(dpojob)],
    }


def queue_name(dpojob: dict[str, Any]) -> str | None:
    """The Kueue LocalQueue the DPOJob asks for (its kueue.x-k8s.io/queue-name label), if any."""
    return (dpojob["metadata"].get("labels") or {}).get(KUEUE_QUEUE_LABEL)


def owner_reference(dpojob: dict[str, Any]) -> dict[str, Any]:
    """Controller reference so deleting the DPOJob garbage-collects its children (no finalizer needed)."""
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": dpojob["metadata"]["name"],
        "uid": dpojob["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def spec_document(dpojob: dict[str, Any], generation: int) -> str:
    """The DPOJob document the trainer reads, as YAML (`dpo-trainer run` takes the same file kubectl applied)."""
    meta = dpojob["metadata"]
    document = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "generation": generation},
        "spec": dpojob["spec"],
    }
    return yaml.safe_dump(document, sort_keys=False)


def build_config_map(dpojob: dict[str, Any], generation: int, attempt: int = 0) -> dict[str, Any]:
    """The run's spec file. Immutable: changing what a run trains takes a new ConfigMap (and the trainer checks the
    file against the digest in its Job, SPEC_DIGEST_ENV, so a ConfigMap replaced behind the operator's back fails
    the run instead of training something else)."""
    meta = dpojob["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": child_metadata(dpojob, run_name(meta["name"], generation, attempt), generation),
        "immutable": True,
        "data": {SPEC_FILE: spec_document(dpojob, generation)},
    }


def _claim_volume(name: str, claim: VolumeClaim) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim.claim_name, "readOnly": claim.read_only}}


def _cache_claim(spec: DPOJobSpec, default_claim: str | None) -> VolumeClaim | None:
    """The Hugging Face cache PVC of the pod: the DPOJob's runtime.cacheVolume, else the operator's default."""
    if spec.runtime.cache_volume is not None:
        return spec.runtime.cache_volume
    return VolumeClaim(claim_name=default_claim) if default_claim else None


def _scratch_dirs(spec: DPOJobSpec, cache: VolumeClaim | None) -> dict[str, str]:
    """Every emptyDir on node disk the trainer writes to, with its size limit: the pod requests their sum."""
    runtime = spec.runtime
    dirs = {"tmp": runtime.scratch_size or (SCRATCH_SIZE if cache else SCRATCH_SIZE_WITH_HF_HOME)}
    if runtime.checkpoint_volume is None:
        dirs["checkpoints"] = runtime.work_dir_size
    return dirs


def _volumes(
    spec: DPOJobSpec, config_map: str, cache: VolumeClaim | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes and mounts: spec file, checkpoints (PVC to survive restarts), scratch, data, output, HF cache."""
    runtime = spec.runtime
    scratch = _scratch_dirs(spec, cache)
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map}},
        _claim_volume("checkpoints", runtime.checkpoint_volume)
        if runtime.checkpoint_volume
        else {"name": "checkpoints", "emptyDir": {"sizeLimit": scratch["checkpoints"]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": scratch["tmp"]}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "checkpoints", "mountPath": spec.checkpointing.directory},
        {"name": "tmp", "mountPath": SCRATCH_MOUNT},
    ]
    for name, claim, path in (
        ("data", runtime.data_volume, DATA_MOUNT),
        ("output", runtime.output_volume, OUTPUT_MOUNT),
        ("cache", cache, CACHE_MOUNT),
    ):
        if claim is not None:
            volumes.append(_claim_volume(name, claim))
            mounts.append({"name": name, "mountPath": path, "readOnly": claim.read_only})
    if runtime.gpus > 1:  # NCCL needs more shared memory than the container default
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def writable_mounts(spec: DPOJobSpec) -> list[str]:
    """Where the trainer pod can write, as `_volumes` mounts it (the root filesystem is read-only): the work volume,
    scratch, and the data, output and cache claims the spec names that are not readOnly. The operator's default
    cache claim (a chart value) is left out: it is no place for a DPOJob's output."""
    _, mounts = _volumes(spec, CONFIG_MOUNT, spec.runtime.cache_volume)
    return [normalized_path(m["mountPath"]) for m in mounts if not m.get("readOnly") and m["mountPath"] != "/dev/shm"]


def on_writable_volume(spec: DPOJobSpec, path: str) -> bool:
    """Whether an absolute path inside the trainer container lies on one of its writable volumes."""
    if not path.startswith("/"):
        return False
    target = normalized_path(path)
    return any(target == mount or target.startswith(mount.rstrip("/") + "/") for mount in writable_mounts(spec))


def _env(
    spec: DPOJobSpec, extra_env: list[dict[str, Any]], cache: VolumeClaim | None, spec_text: str
) -> list[dict[str, Any]]:
    """The trainer's env: fixed settings, the operator's extra env (values or Secret/ConfigMap key refs), the token.

    HF_HOME is on the cache volume when there is one. `datasets` writes its own cache (Arrow files) under HF_HOME
    even when every file is cached, so with a read-only cache volume that one goes to scratch."""
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HF_HOME", "value": HF_HOME_ON_CACHE if cache else HF_HOME_ON_SCRATCH},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": TERMINATION_PATH_ENV, "value": TERMINATION_MESSAGE_PATH},
        {"name": SPEC_DIGEST_ENV, "value": hashlib.sha256(spec_text.encode()).hexdigest()},
    ]
    if cache is not None and cache.read_only:
        env.append({"name": "HF_DATASETS_CACHE", "value": f"{SCRATCH_MOUNT}/hf-datasets"})
    env += extra_env
    if spec.hub_token_secret_ref is not None:
        ref = spec.hub_token_secret_ref
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _resources(spec: DPOJobSpec, cache: VolumeClaim | None) -> dict[str, Any]:
    """CPU, memory and GPUs from the spec; ephemeral storage (request = limit) covering every emptyDir on node disk
    plus the logs, so the scheduler places the pod where the disk is and the kubelet bounds it."""
    runtime = spec.runtime
    storage = sum(parse_quantity(size) for size in [*_scratch_dirs(spec, cache).values(), LOG_ALLOWANCE])
    requests = {"cpu": runtime.cpu, "memory": runtime.memory, "ephemeral-storage": _bytes_quantity(int(storage))}
    limits = {"memory": runtime.memory, "ephemeral-storage": requests["ephemeral-storage"]}
    if runtime.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(runtime.gpus)
    return {"requests": requests, "limits": limits}


def _bytes_quantity(size: int) -> str:
    """A byte count as a quantity in the largest binary unit that holds it exactly: 96Gi, not 103079215104."""
    for unit, shift in (("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)):
        if size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def build_job(
    dpojob: dict[str, Any],
    spec: DPOJobSpec,
    generation: int,
    extra_env: list[dict[str, Any]] | None = None,
    *,
    attempt: int = 0,
    features: ServerFeatures = ServerFeatures(),
    default_cache_claim: str | None = None,
    defaults: TrainerDefaults | None = None,
) -> dict[str, Any]:
    """The batch/v1 Job that runs `dpo-trainer` for one run of the DPOJob.

    default_cache_claim: the PVC mounted as the Hugging Face cache when the DPOJob names none (the chart value
    trainerDefaults.cacheClaimName). defaults: the cluster's other trainer defaults (the chart's trainerDefaults),
    each applied where the DPOJob sets nothing (runtime_with_defaults); their labels and annotations are added to
    the pod's, the operator's own winning.

    On servers with podFailurePolicy (>= 1.26) a pod evicted or preempted is replaced without spending a
    retry (the trainer resumes from its checkpoint), and a trainer exit code the same spec would meet again
    (FAIL_AT_ONCE_EXIT_CODES) fails the Job at once; older servers leave the latter to the reconciler. A DPOJob
    with a Kueue queue label gets a Job with the same labels, created suspended where the server has Job suspend
    (>= 1.21): Kueue unsuspends it on admission. The operator changes a Job it created only to stop it (parallelism
    0), so Kueue's suspend and injected scheduling stay.
    """
    meta = dpojob["metadata"]
    name = run_name(meta["name"], generation, attempt)
    runtime = runtime_with_defaults(dpojob, spec, defaults)
    cache = _cache_claim(spec, default_cache_claim)
    volumes, mounts = _volumes(spec, name, cache)
    container = {
        "name": CONTAINER,
        "image": runtime.image,
        "imagePullPolicy": runtime.image_pull_policy,
        "command": ["dpo-trainer"],
        "args": [
            "run",
            posixpath.join(CONFIG_MOUNT, SPEC_FILE),
            *(["--sft-cache", cache_dir] if (cache_dir := sft_cache_directory(spec)) else []),
            "--output",
            work_directory(spec, meta["name"]),
        ],
        "env": _env(spec, extra_env or [], cache, spec_document(dpojob, generation)),
        "resources": _resources(spec, cache),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    optional = {
        "nodeSelector": runtime.node_selector or None,
        "tolerations": [t.model_dump(by_alias=True, exclude_none=True) for t in runtime.tolerations] or None,
        "affinity": runtime.affinity,
        "priorityClassName": runtime.priority_class_name,
        "serviceAccountName": runtime.service_account_name,
        "imagePullSecrets": [{"name": s.name} for s in runtime.image_pull_secrets] or None,
    }
    pod_spec.update({k: v for k, v in optional.items() if v is not None})
    job_spec: dict[str, Any] = {
        "backoffLimit": runtime.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "metadata": {
                "labels": {**(defaults.labels if defaults else {}), **labels(meta["name"], generation)},
                "annotations": {**(defaults.annotations if defaults else {}), ANNOTATION_DPOJOB: meta["name"]},
            },
            "spec": pod_spec,
        },
    }
    if runtime.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = runtime.active_deadline_seconds
    queue_labels = {k: v for k, v in (meta.get("labels") or {}).items() if k in KUEUE_LABELS}
    if queue_labels.get(KUEUE_QUEUE_LABEL) and features.job_suspend:
        job_spec["suspend"] = True
    if features.pod_failure_policy:
        job_spec["podFailurePolicy"] = {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": CONTAINER,
                        "operator": "In",
                        "values": list(FAIL_AT_ONCE_EXIT_CODES),
                    },
                },
            ]
        }
    metadata = child_metadata(dpojob, name, generation)
    metadata["labels"].update(queue_labels)
    metadata["annotations"][TEMPLATE_ANNOTATION] = digest(job_spec)
    metadata["annotations"][SPEC_GENERATION_ANNOTATION] = str(meta.get("generation", ""))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": job_spec,
    }
