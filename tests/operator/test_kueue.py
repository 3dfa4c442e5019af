"""The operator under Kueue: a DPOJob with a queue label gets a Job Kueue can manage, and the two never fight.

Our control plane is Kubernetes 1.20, which has no Job `suspend` (the field is dropped), so Kueue's side is
played by a stand-in on an in-memory cluster behind the reconciler's Kube boundary: it suspends a labelled
Job on creation (Kueue's webhook), admits it (unsuspend + injected nodeSelector, then the Job controller's
pod) and preempts it (pods deleted, Job suspended again) — the fault a real 1.20 server cannot produce.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from dpo_operator import manifests
from dpo_operator.cache import ObjectCache
from dpo_operator.health import Health
from dpo_operator.manifests import KUEUE_QUEUE_LABEL, ServerFeatures
from dpo_operator.reconciler import Reconciler
from dpo_operator.settings import OperatorSettings
from dpo_operator.workqueue import WorkQueue

NS, NAME = "team-a", "aligned"
INJECTED = {"cloud.example.com/accelerator": "h100"}
_uids = itertools.count(1)


def merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386, as the API server applies a merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class Cluster:
    """The part of the API the reconciler uses (its Kube boundary), plus Kueue's webhook on Job creation."""

    def __init__(self, dpojob: dict[str, Any]) -> None:
        self.dpojob = dpojob
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[tuple[str, str, str]] = []
        self.job_writes: list[str] = []
        self.core = object()  # log followers start only for pods with a running container: none here

    def get_dpojob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.dpojob)

    def patch_status(self, dpojob: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        merge(self.dpojob.setdefault("status", {}), patch)
        return copy.deepcopy(self.dpojob)

    def feed(self, cache: ObjectCache) -> None:
        """What the operator's watches would deliver: the current objects into its cache (each at a new
        resourceVersion, as after a change: the cache keeps what it holds at the same one)."""
        self.revision = getattr(self, "revision", 1) + 1
        for obj in [self.dpojob, *self.objects.values()]:
            obj["metadata"]["resourceVersion"] = str(self.revision)
        cache.replace_all("DPOJob", [self.dpojob], None)
        for wanted in ("Job", "Pod"):
            cache.replace_all(wanted, [o for (kind, _), o in self.objects.items() if kind == wanted], None)

    def create_or_adopt(self, body: dict[str, Any], owner_uid: str) -> tuple[dict[str, Any], bool]:
        key = (body["kind"], body["metadata"]["name"])
        if key in self.objects:
            return copy.deepcopy(self.objects[key]), False
        obj = copy.deepcopy(body)
        obj["metadata"].update(uid=f"uid-{next(_uids)}", creationTimestamp="2026-12-02T00:00:01Z")
        if body["kind"] == "Job":
            self.job_writes.append(f"create {key[1]}")
            if KUEUE_QUEUE_LABEL in obj["metadata"]["labels"]:
                obj["spec"]["suspend"] = True  # Kueue's webhook suspends every Job of a queue
        self.objects[key] = obj
        return copy.deepcopy(obj), True

    def patch(self, obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        held = self.objects[obj["kind"], obj["metadata"]["name"]]
        assert held["metadata"]["uid"] == obj["metadata"]["uid"], "a patch is conditional on the UID"
        merge(held, patch)
        return copy.deepcopy(held)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.objects.get((kind, name)))

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        held = self.objects.get((kind, name))
        if held is None or (uid is not None and held["metadata"]["uid"] != uid):
            return False
        if kind == "Job":
            self.job_writes.append(f"delete {name}")
        return self.objects.pop((kind, name), None) is not None

    def post_event(self, dpojob: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        self.events.append((event_type, reason, message))

    def failed_creates(self, namespace: str) -> dict[str, str]:
        return {}  # the stand-in Job controller always manages to create the pod

    # --- Kueue and the Job controller, played by the test
    def job(self) -> dict[str, Any]:
        (job,) = [o for (kind, _), o in self.objects.items() if kind == "Job"]
        return job

    def admit(self) -> None:
        job = self.job()
        job["spec"]["suspend"] = False
        job["spec"]["template"]["spec"]["nodeSelector"] = {**INJECTED}
        self.start_pod("Running")

    def start_pod(self, phase: str, trainer_state: dict[str, Any] | None = None) -> dict[str, Any]:
        """The Job controller's pod for the Job, in `phase`, with the trainer container in `trainer_state`."""
        job = self.job()
        pod = {
            "kind": "Pod",
            "metadata": {
                "name": f"{job['metadata']['name']}-{next(_uids)}",
                "namespace": NS,
                "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
                "ownerReferences": [
                    {"kind": "Job", "name": job["metadata"]["name"], "uid": job["metadata"]["uid"], "controller": True}
                ],
                "creationTimestamp": "2026-12-02T00:00:02Z",
            },
            "status": {"phase": phase},
        }
        if trainer_state is not None:
            pod["status"]["containerStatuses"] = [{"name": "trainer", "state": trainer_state, "restartCount": 0}]
        self.objects["Pod", pod["metadata"]["name"]] = pod
        return pod

    def preempt(self) -> None:
        for key in [k for k in self.objects if k[0] == "Pod"]:
            del self.objects[key]
        self.job()["spec"]["suspend"] = True

    def finish(self) -> None:
        for key, pod in self.objects.items():
            if key[0] == "Pod":
                pod["status"] = {"phase": "Succeeded"}
        self.job()["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}


def dpojob(checkpoint_volume: bool) -> dict[str, Any]:
    runtime: dict[str, Any] = {"checkpointVolume": {"claimName": "ckpt"}} if checkpoint_volume else {}
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {
            "name": NAME,
            "namespace": NS,
            "uid": "dpojob-uid",
            "generation": 1,
            "resourceVersion": "1",
            "creationTimestamp": "2026-12-02T00:00:00Z",
            "labels": {KUEUE_QUEUE_LABEL: "gpu-queue", "kueue.x-k8s.io/priority-class": "research"},
        },
        "spec": {"model": {"name": "tiny"}, "output": {"hub": {"repoId": "org/m"}}, "runtime": runtime},
    }


def settle(cluster: Cluster, reconciler: Reconciler) -> None:
    for _ in range(3):  # the first pass records the run; later passes create and observe
        cluster.feed(reconciler.cache)
        reconciler.reconcile(NS, NAME)
    reconciler.events.join()


def new_reconciler(cluster: Cluster) -> Reconciler:
    reconciler = Reconciler(
        cluster, ObjectCache(), WorkQueue(), OperatorSettings(), Health(), ServerFeatures(job_suspend=True)
    )
    reconciler.events.start()  # the workers stay off: the test reconciles itself
    return reconciler


def ready(cluster: Cluster) -> tuple[str, str]:
    status = cluster.dpojob["status"]
    condition = next(c for c in status["conditions"] if c["type"] == "Ready")
    return status["phase"], condition["reason"]


@pytest.fixture
def run_with_kueue() -> tuple[Cluster, Reconciler]:
    cluster = Cluster(dpojob(checkpoint_volume=True))
    return cluster, new_reconciler(cluster)


def test_queued_admitted_preempted_resumed_without_fighting_kueue(run_with_kueue) -> None:
    cluster, reconciler = run_with_kueue
    settle(cluster, reconciler)
    job = cluster.job()
    assert job["spec"]["suspend"] is True, "created suspended: Kueue decides when it runs"
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research"
    assert ready(cluster) == ("Pending", "Queued")
    assert ("Normal", "Queued") in [(t, r) for t, r, _ in cluster.events]

    cluster.admit()
    settle(cluster, reconciler)
    assert ready(cluster) == ("Running", "Running")
    job = cluster.job()
    assert job["spec"]["suspend"] is False and job["spec"]["template"]["spec"]["nodeSelector"] == INJECTED

    cluster.preempt()
    settle(cluster, reconciler)
    assert ready(cluster) == ("Pending", "Queued"), "preempted by Kueue: queued again, not suspended by the user"
    assert cluster.job()["spec"]["suspend"] is True, "the operator does not unsuspend what Kueue suspended"
    assert [r for _, r, _ in cluster.events].count("Queued") == 2

    cluster.admit()
    settle(cluster, reconciler)
    cluster.finish()
    settle(cluster, reconciler)
    assert ready(cluster) == ("Succeeded", "Succeeded")
    assert cluster.job_writes == [f"create {manifests.run_name(NAME, 1)}"], "one Job, never updated or replaced"
    assert "PreemptionRestartsTraining" not in [r for _, r, _ in cluster.events]


def test_a_queued_run_without_checkpoint_volume_is_warned_about_preemption() -> None:
    cluster = Cluster(dpojob(checkpoint_volume=False))
    settle(cluster, new_reconciler(cluster))
    warning = next(e for e in cluster.events if e[1] == "PreemptionRestartsTraining")
    assert warning[0] == "Warning" and "checkpointVolume" in warning[2]


def test_servers_without_job_suspend_get_the_labels_only() -> None:
    document = dpojob(checkpoint_volume=True)
    spec = manifests.DPOJobSpec.model_validate(document["spec"])
    job = manifests.build_job(document, spec, 1, features=ServerFeatures(job_suspend=False))
    assert "suspend" not in job["spec"] and job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    document["metadata"]["labels"] = {}
    plain = manifests.build_job(document, spec, 1, features=ServerFeatures(job_suspend=True))
    assert "suspend" not in plain["spec"] and KUEUE_QUEUE_LABEL not in plain["metadata"]["labels"]
