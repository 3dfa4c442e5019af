"""Which Jobs are the operator's (ownership.py): a signature over the Job's UID, not its content.

The pure signer, then the reconciler against test_kueue's in-memory cluster (its Kube boundary); the same two
directions on the real control plane, with a real mutating webhook and forged Jobs, are in
test_operator_e2e.py, and the signing-key Secret in test_kube.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dpo_operator import manifests
from dpo_operator.ownership import SIGNATURE_ANNOTATION, RunSigner
from dpojob_api.spec import DPOJobSpec

DPOJOB = {
    "metadata": {"name": "victim", "namespace": "team-a", "uid": "dpojob-uid", "generation": 2},
    "spec": {"model": {"name": "tiny"}, "output": {"hub": {"repoId": "org/m"}}},
}


def created(job_uid: str = "job-uid") -> dict[str, Any]:
    """The Job as the API server returns it from the operator's create: with its UID."""
    job = manifests.build_job(DPOJOB, DPOJobSpec.model_validate(DPOJOB["spec"]), 2)
    job["metadata"]["uid"] = job_uid
    return job


def signed(signer: RunSigner, job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["metadata"]["annotations"][SIGNATURE_ANNOTATION] = signer.signature(job, "dpojob-uid")
    return job


def test_a_signed_job_stays_ours_whatever_admission_webhooks_add() -> None:
    signer = RunSigner.ephemeral()
    job = signed(signer, created())
    assert signer.signed(job, "dpojob-uid")
    mutated = copy.deepcopy(job)  # a sidecar injector, an env-adding policy, an image rewrite, extra labels
    pod = mutated["spec"]["template"]["spec"]
    pod["containers"].append({"name": "istio-proxy", "image": "proxy:1"})
    pod["containers"][0]["env"].append({"name": "INJECTED", "value": "1"})
    pod["containers"][0]["image"] = "mirror.internal/trainer:0.1.0"
    mutated["metadata"]["labels"]["policy.example.com/checked"] = "true"
    assert signer.signed(mutated, "dpojob-uid")


def test_nothing_copied_from_a_signed_job_makes_another_job_pass() -> None:
    signer = RunSigner.ephemeral()
    ours = signed(signer, created())
    copy_of_everything = {**copy.deepcopy(ours), "metadata": {**copy.deepcopy(ours["metadata"]), "uid": "forged-uid"}}
    assert not signer.signed(copy_of_everything, "dpojob-uid"), "another Job (another UID) with the same annotation"
    renamed = copy.deepcopy(ours)
    renamed["metadata"]["name"] = manifests.run_name("victim", 3)
    assert not signer.signed(renamed, "dpojob-uid"), "the signature names the Job"
    assert not signer.signed(ours, "another-dpojob-uid"), "and the DPOJob it runs for"
    template = copy.deepcopy(ours)
    template["metadata"]["annotations"][manifests.TEMPLATE_ANNOTATION] = "0" * 16
    assert not signer.signed(template, "dpojob-uid"), "and the template hash"
    unsigned = created()
    assert not signer.signed(unsigned, "dpojob-uid")
    assert not RunSigner.ephemeral().signed(ours, "dpojob-uid"), "another key"
    with pytest.raises(ValueError):
        RunSigner(b"short")


# --- the reconciler -----------------------------------------------------------------------------------


def in_memory() -> tuple[Any, Any]:
    from test_reconciler import in_memory_cluster

    return in_memory_cluster()


def test_the_operator_signs_the_job_it_creates() -> None:
    from test_kueue import NAME, settle

    cluster, reconciler = in_memory()
    settle(cluster, reconciler)
    job = cluster.objects["Job", manifests.run_name(NAME, 1)]
    assert reconciler.signer.signed(job, cluster.dpojob["metadata"]["uid"])
    assert cluster.dpojob["status"]["trainer"]["jobName"] == job["metadata"]["name"]
    reconciler.events.stop()


def test_a_forged_job_claiming_the_next_run_is_deleted_and_the_run_gets_its_own() -> None:
    """Everything visible copied from the run's signed Job (labels, annotations with the signature, ownerRef, the
    exact template) onto the next run's name: not the run; deleted (by UID), an Event says why, ours replaces it."""
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
    assert job["metadata"]["uid"] != "forged-uid" and reconciler.signer.signed(job, "dpojob-uid")
    assert f"delete {second}" in cluster.job_writes and cluster.job_writes[-1] == f"create {second}"
    assert any(reason == "UntrustedJob" for _, reason, _ in cluster.events)
    assert cluster.dpojob["status"]["trainer"]["jobName"] == second
    reconciler.events.stop()


def test_a_job_left_unsigned_by_a_crash_is_replaced_and_a_signed_one_is_adopted_after_a_restart() -> None:
    """The operator stopped between creating a Job and signing it: the Job is indistinguishable from a forgery,
    so it is replaced. A signed Job whose status write was lost (and which a webhook changed) is adopted as it is
    by a new operator process with the same key."""
    from test_kueue import NAME, NS, new_reconciler, settle

    cluster, reconciler = in_memory()
    patch = cluster.patch

    def killed(obj: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("the operator was killed")

    cluster.patch = killed
    cluster.feed(reconciler.cache)
    with pytest.raises(RuntimeError):
        reconciler.reconcile(NS, NAME)  # a first run is recorded with its Job: created, then killed
    name = manifests.run_name(NAME, 1)
    unsigned_uid = cluster.objects["Job", name]["metadata"]["uid"]
    assert SIGNATURE_ANNOTATION not in cluster.objects["Job", name]["metadata"]["annotations"]

    cluster.patch = patch
    settle(cluster, reconciler)
    job = cluster.objects["Job", name]
    assert job["metadata"]["uid"] != unsigned_uid and reconciler.signer.signed(job, "dpojob-uid")

    job["spec"]["template"]["spec"]["containers"].append({"name": "sidecar", "image": "proxy:1"})  # a webhook
    cluster.dpojob["status"].pop("trainer")  # the status write after the create was lost
    restarted = new_reconciler(cluster)
    restarted.signer = reconciler.signer  # the key is in a Secret: the same after a restart
    writes = list(cluster.job_writes)
    settle(cluster, restarted)
    assert cluster.job_writes == writes, "adopted: nothing deleted or created"
    assert cluster.dpojob["status"]["trainer"]["jobName"] == name
    reconciler.events.stop()
    restarted.events.stop()
