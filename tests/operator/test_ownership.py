"""Which Jobs are the operator's (Reconciler.trusted): the UID of the Job it created, recorded in the status, never
the Job's content.

The reconciler against test_kueue's in-memory cluster (its Kube boundary); the same two directions on the real
control plane, with a real mutating webhook and forged Jobs, are in test_operator_e2e.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dpo_operator import manifests


def in_memory() -> tuple[Any, Any]:
    from test_reconciler import in_memory_cluster

    return in_memory_cluster()


def job_uid(status: dict[str, Any]) -> str | None:
    return (status.get("internal") or {}).get("jobUid")


def test_the_uid_of_the_job_the_operator_created_is_recorded_with_its_run() -> None:
    from test_kueue import NAME, settle

    cluster, reconciler = in_memory()
    settle(cluster, reconciler)
    job = cluster.objects["Job", manifests.run_name(NAME, 1)]
    assert job_uid(cluster.dpojob["status"]) == job["metadata"]["uid"]
    assert cluster.dpojob["status"]["trainer"]["jobName"] == job["metadata"]["name"]
    reconciler.events.stop()


def test_a_job_admission_webhooks_changed_stays_the_run() -> None:
    """A sidecar injector, an env-adding policy, an image rewrite, extra labels: the Job is still the run."""
    from test_kueue import NAME, NS, settle

    cluster, reconciler = in_memory()
    settle(cluster, reconciler)
    job = cluster.objects["Job", manifests.run_name(NAME, 1)]
    pod = job["spec"]["template"]["spec"]
    pod["containers"].append({"name": "istio-proxy", "image": "proxy:1"})
    pod["containers"][0]["env"].append({"name": "INJECTED", "value": "1"})
    pod["containers"][0]["image"] = "mirror.internal/trainer:0.1.0"
    job["metadata"]["labels"]["policy.example.com/checked"] = "true"
    writes = list(cluster.job_writes)
    cluster.feed(reconciler.cache)
    reconciler.reconcile(NS, NAME)
    assert cluster.job_writes == writes, "nothing deleted or created"
    assert not any(reason == "UntrustedJob" for _, reason, _ in cluster.events)
    reconciler.events.stop()


def test_a_forged_job_claiming_the_next_run_is_deleted_and_the_run_gets_its_own() -> None:
    """Everything visible copied from the run's Job (labels, annotations, ownerRef, the exact template) onto the
    next run's name: not the run; deleted (by UID), an Event says why, ours replaces it."""
    from test_kueue import NAME, settle
    from test_reconciler import new_generation

    cluster, reconciler = in_memory()
    settle(cluster, reconciler)
    first, second = manifests.run_name(NAME, 1), manifests.run_name(NAME, 2)
    forged = copy.deepcopy(cluster.objects["Job", first])
    forged["metadata"].update(name=second, uid="forged-uid")
    cluster.objects["Job", second] = forged

    new_generation(cluster, 0.2)
    settle(cluster, reconciler)
    job = cluster.objects["Job", second]
    assert job["metadata"]["uid"] != "forged-uid" and job_uid(cluster.dpojob["status"]) == job["metadata"]["uid"]
    assert f"delete {second}" in cluster.job_writes and cluster.job_writes[-1] == f"create {second}"
    assert any(reason == "UntrustedJob" for _, reason, _ in cluster.events)
    assert cluster.dpojob["status"]["trainer"]["jobName"] == second
    reconciler.events.stop()


def test_a_job_is_trusted_until_its_status_write_lands_and_replaced_if_a_restart_lost_it() -> None:
    """Between creating a Job and the status write that records it (under a burst it waits behind other DPOJobs'
    Jobs) the operator process trusts it from memory. A restarted operator cannot tell a Job it created but never
    recorded from a forgery: it replaces it. One that was recorded it adopts as it is."""
    from test_kueue import NAME, NS, new_reconciler, settle

    cluster, reconciler = in_memory()
    patch_status = cluster.patch_status

    def refused(dpojob: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("the status write failed")

    cluster.patch_status = refused
    cluster.feed(reconciler.cache)
    with pytest.raises(RuntimeError):
        reconciler.reconcile(NS, NAME)  # a first run is recorded with its Job: created, then the write fails
    name = manifests.run_name(NAME, 1)
    created_uid = cluster.objects["Job", name]["metadata"]["uid"]
    assert job_uid(cluster.dpojob.get("status") or {}) is None

    cluster.patch_status = patch_status
    settle(cluster, reconciler)  # the same process: its Job, recorded now
    assert cluster.job_writes == [f"create {name}"]
    assert job_uid(cluster.dpojob["status"]) == created_uid

    cluster.dpojob["status"]["internal"].pop("jobUid")  # as if the process had stopped before that write
    restarted = new_reconciler(cluster)
    settle(cluster, restarted)
    assert cluster.job_writes == [f"create {name}", f"delete {name}", f"create {name}"], "replaced"
    assert any(reason == "UntrustedJob" for _, reason, _ in cluster.events)
    replaced_uid = cluster.objects["Job", name]["metadata"]["uid"]
    assert replaced_uid != created_uid and job_uid(cluster.dpojob["status"]) == replaced_uid

    again = new_reconciler(cluster)
    settle(cluster, again)
    assert cluster.job_writes[-1] == f"create {name}" and len(cluster.job_writes) == 3, "adopted: nothing written"
    for one in (reconciler, restarted, again):
        one.events.stop()
