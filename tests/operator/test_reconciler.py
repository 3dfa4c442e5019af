"""Run identity (pure parts of the reconciler): what starts a new run, and retrying a Failed one; the order of
writes under a burst."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

from dpo_operator import manifests
from dpo_operator.reconciler import RETRY_ANNOTATION, current_run, stopping_pod, validate_spec
from dpojob_api.spec import legacy_spec_hash, spec_hash

SPEC = {
    "model": {"name": "tiny"},
    "dpo": {"beta": 0.1},
    "output": {"hub": {"repoId": "org/m"}},
    "hubTokenSecretRef": {"name": "hf-token"},
}


def dpojob(spec: dict, generation: int, status: dict | None = None, retry: str | None = None) -> dict:
    annotations = {RETRY_ANNOTATION: retry} if retry else {}
    return {"metadata": {"generation": generation, "annotations": annotations}, "spec": spec, "status": status or {}}


def recorded(spec: dict, phase: str = "Running", **run: object) -> dict:
    return {"run": {"generation": 1, "specHash": spec_hash(spec), **run}, "phase": phase}


def test_edits_that_do_not_change_the_model_keep_the_run() -> None:
    status = recorded(SPEC)
    for section, value in (
        ("hubTokenSecretRef", {"name": "other-secret", "key": "t"}),
        ("runtime", {"gpus": 4, "memory": "64Gi"}),
        ("checkpointing", {"saveSteps": 50}),
        ("reporting", {"reportTo": ["tensorboard"]}),
        ("suspend", True),
    ):
        edited = {**SPEC, section: value}
        assert current_run(dpojob(edited, 2, status)) == status["run"], f"{section} must not start a new run"
    changed = current_run(dpojob({**SPEC, "dpo": {"beta": 0.2}}, 2, status))
    assert changed["generation"] == 2 and changed["specHash"] != status["run"]["specHash"]


def test_runs_recorded_by_the_previous_release_are_kept_after_an_upgrade() -> None:
    legacy = {"run": {"generation": 1, "specHash": legacy_spec_hash(SPEC)}, "phase": "Succeeded"}
    assert current_run(dpojob(SPEC, 3, legacy)) == legacy["run"]


def test_a_failed_run_is_retried_once_per_new_annotation_value() -> None:
    failed = recorded(SPEC, "Failed")
    assert current_run(dpojob(SPEC, 1, failed)) == failed["run"], "no annotation: the failure stands"
    retried = current_run(dpojob(SPEC, 1, failed, retry="1"))
    assert retried == {**failed["run"], "attempt": 1, "retryToken": "1"}
    again = recorded(SPEC, "Failed", attempt=1, retryToken="1")
    assert current_run(dpojob(SPEC, 1, again, retry="1")) == again["run"], "the same value retries only once"
    assert current_run(dpojob(SPEC, 1, again, retry="2"))["attempt"] == 2
    succeeded = recorded(SPEC, "Succeeded")
    assert current_run(dpojob(SPEC, 1, copy.deepcopy(succeeded), retry="1")) == succeeded["run"]
    assert manifests.run_name("job", 1, 2) == "job-g1-r2" and manifests.run_name("job", 1) == "job-g1"


def test_only_a_pod_of_the_runs_own_job_that_is_really_stopping_is_waited_for() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def pod(owner: str | None, deleting_since: str | None = None, phase: str = "Running") -> dict:
        meta: dict = {"name": f"p-{owner}", "ownerReferences": []}
        if owner:
            meta["ownerReferences"] = [{"kind": "Job", "name": owner, "controller": True}]
        if deleting_since:
            meta["deletionTimestamp"] = deleting_since
        return {"metadata": meta, "status": {"phase": phase}}

    ours = pod("job-g1", "2026-12-02T11:58:00Z")
    assert stopping_pod([ours], "job-g1", now) is ours
    assert stopping_pod([pod(None), pod("someone-elses")], "job-g1", now) is None, "labels alone do not block"
    assert stopping_pod([pod("job-g1", phase="Failed")], "job-g1", now) is None
    assert stopping_pod([pod("job-g1", "2026-12-02T11:50:00Z")], "job-g1", now) is None, "a lost node's pod"


def test_pod_level_fields_are_validated_before_any_job_is_built() -> None:
    """What the API server would refuse for the Job (and so stay Pending without a word) is InvalidSpec at once."""
    base = {**SPEC, "hubTokenSecretRef": {"name": "hf-token", "key": "token"}}
    cases = {
        "spec.checkpointing.directory": [
            {"checkpointing": {"directory": d}} for d in ("/tmp", "/data", "/cache", "work")
        ],
        "tolerationSeconds": [
            {"runtime": {"tolerations": [{"key": "k", "effect": "NoSchedule", "tolerationSeconds": 30}]}}
        ],
        "spec.hubTokenSecretRef.key": [{"hubTokenSecretRef": {"name": "hf-token", "key": "a/b"}}],
        "spec.runtime.nodeSelector": [{"runtime": {"nodeSelector": {"bad key!": "x"}}}],
        "spec.runtime.priorityClassName": [{"runtime": {"priorityClassName": "Not_A_Name"}}],
        "spec.runtime.serviceAccountName": [{"runtime": {"serviceAccountName": "UPPER"}}],
        "spec.runtime.scratchSize": [{"runtime": {"scratchSize": "lots"}}],
    }
    for field, edits in cases.items():
        for edit in edits:
            _, error = validate_spec({**base, **edit})
            assert error is not None and field in error, (edit, error)
    assert validate_spec({**base, "checkpointing": {"directory": "/tmp/dpo/work"}})[1] is None
    assert validate_spec({**base, "runtime": {"nodeSelector": {"nvidia.com/gpu.product": "H100"}}})[1] is None


def test_under_a_burst_a_new_dpojob_gets_its_job_first_and_its_status_in_one_write_after() -> None:
    """Against the in-memory cluster of test_kueue (the reconciler's Kube boundary), without Kueue labels."""
    from test_kueue import NAME, NS, Cluster, new_reconciler
    from test_kueue import dpojob as kueue_dpojob

    document = kueue_dpojob(checkpoint_volume=True)
    document["metadata"]["labels"] = {}
    cluster = Cluster(document)
    patches: list[dict] = []
    patch_status = cluster.patch_status
    cluster.patch_status = lambda dpojob, patch: patches.append(patch) or patch_status(dpojob, patch)
    reconciler = new_reconciler(cluster)
    cluster.feed(reconciler.cache)
    other = (NS, "submitted-just-before")
    reconciler.queue.add(other, urgent=True)

    reconciler.reconcile(NS, NAME)
    assert cluster.job_writes == [f"create {manifests.run_name(NAME, 1)}"], "the Job comes first"
    assert patches == [] and "status" not in cluster.dpojob, "its status write waits for the other new DPOJob"
    assert reconciler.queue.get(timeout=1) == other, "the urgent lane first"
    reconciler.queue.done(other)
    assert reconciler.queue.get(timeout=1) == (NS, NAME), "then the deferred status write"

    reconciler.reconcile(NS, NAME)
    assert len(patches) == 1, "a first run is recorded with its Job, in one write"
    status = cluster.dpojob["status"]
    assert status["run"]["generation"] == 1 and status["trainer"]["jobName"] == manifests.run_name(NAME, 1)
    assert cluster.job_writes == [f"create {manifests.run_name(NAME, 1)}"], "created once"
    reconciler.events.stop()
