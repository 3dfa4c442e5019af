"""Run identity (pure parts of the reconciler): what starts a new run, and retrying a Failed one; the order of
writes under a burst."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from dpo_operator import manifests, metrics
from dpo_operator.reconciler import (
    RETRY_ANNOTATION,
    PodCreationErrors,
    Reconciler,
    current_run,
    stopping_pod,
    validate_spec,
)
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


def test_only_a_pod_of_the_dpojobs_own_jobs_that_is_really_stopping_is_waited_for() -> None:
    """Runs that train the same share a work directory (a retry, an output-only edit): a new pod waits for any
    earlier run's or attempt's pod of the DPOJob that is still stopping."""
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def pod(owner: str | None, deleting_since: str | None = None, phase: str = "Running") -> dict:
        meta: dict = {"name": f"p-{owner}", "ownerReferences": []}
        if owner:
            meta["ownerReferences"] = [{"kind": "Job", "name": owner, "controller": True}]
        if deleting_since:
            meta["deletionTimestamp"] = deleting_since
        return {"metadata": meta, "status": {"phase": phase}}

    for owner in ("job-g1", "job-g1-r1", "job-g7"):
        ours = pod(owner, "2026-12-02T11:58:00Z")
        assert stopping_pod([ours], "job", now) is ours, owner
    others = [pod(None), pod("someone-elses"), pod("job-other-g1"), pod("jobs-g1"), pod("job-g1-x")]
    assert stopping_pod(others, "job", now) is None, "labels alone, or a name not of our runs, do not block"
    assert stopping_pod([pod("job-g1", phase="Failed")], "job", now) is None
    assert stopping_pod([pod("job-g1", "2026-12-02T11:50:00Z")], "job", now) is None, "a lost node's pod"
    long_name = "x" * 60
    assert manifests.runs_job(long_name, manifests.run_name(long_name, 3, 1))


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


def test_a_reserved_path_spelled_another_way_is_still_reserved() -> None:
    base = {**SPEC, "hubTokenSecretRef": {"name": "hf-token", "key": "token"}}
    for directory in ("//data", "/data/", "/tmp/../data", "//", "/./cache//", "///etc/dpo-operator"):
        _, error = validate_spec({**base, "checkpointing": {"directory": directory}})
        assert error is not None and "spec.checkpointing.directory" in error, directory
    assert validate_spec({**base, "checkpointing": {"directory": "//work/checkpoints"}})[1] is None
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


def in_memory_cluster() -> tuple[Any, Reconciler]:
    """test_kueue's in-memory cluster, without Kueue labels, plus the lists relist makes."""
    from test_kueue import Cluster, new_reconciler
    from test_kueue import dpojob as kueue_dpojob

    class Listed(Cluster):
        def list_all(self, kind: str, namespaces: list[str], **_: object) -> tuple[list[dict[str, Any]], str | None]:
            listed = [self.dpojob] if kind == "DPOJob" and self.dpojob else []
            listed += [o for (k, _), o in self.objects.items() if k == kind]
            return copy.deepcopy(listed), "100"

    document = kueue_dpojob(checkpoint_volume=True)
    document["metadata"]["labels"] = {}
    cluster = Listed(document)
    return cluster, new_reconciler(cluster)


def new_generation(cluster: Any, beta: float) -> None:
    """A spec edit that changes the model: a new run, whose Job replaces the previous run's."""
    cluster.dpojob["spec"]["dpo"] = {"beta": beta}
    cluster.dpojob["metadata"]["generation"] += 1


def test_a_superseded_runs_config_map_is_deleted_only_when_the_dpojob_owns_it() -> None:
    from test_kueue import NAME, settle

    cluster, reconciler = in_memory_cluster()
    settle(cluster, reconciler)
    first, second = manifests.run_name(NAME, 1), manifests.run_name(NAME, 2)
    assert {("Job", first), ("ConfigMap", first)} <= set(cluster.objects)
    foreign = cluster.objects["ConfigMap", first]
    foreign["metadata"]["ownerReferences"] = [{**foreign["metadata"]["ownerReferences"][0], "uid": "someone-else"}]

    new_generation(cluster, 0.2)
    settle(cluster, reconciler)
    assert ("Job", first) not in cluster.objects and ("Job", second) in cluster.objects
    assert cluster.objects["ConfigMap", first] is foreign, "a same-named ConfigMap someone else owns is kept"

    new_generation(cluster, 0.3)
    settle(cluster, reconciler)
    assert ("Job", second) not in cluster.objects and ("ConfigMap", second) not in cluster.objects, "ours goes"
    reconciler.events.stop()


def test_a_dpojob_whose_delete_the_watch_missed_is_forgotten_at_the_relist() -> None:
    from test_kueue import NAME, NS, settle

    cluster, reconciler = in_memory_cluster()
    settle(cluster, reconciler)
    metrics.record_rewards(NS, NAME, {"accuracies": 0.75})
    forgotten: list[tuple[str, str]] = []
    reconciler.followers.forget = lambda namespace, name: forgotten.append((namespace, name))
    assert (NS, NAME) in reconciler.phases

    cluster.dpojob = None  # deleted while the watch was down: no DELETED event came
    reconciler.relist()
    assert reconciler.cache.dpojob(NS, NAME) is None and (NS, NAME) not in reconciler.phases
    sample = {"namespace": NS, "name": NAME}
    assert metrics.REGISTRY.get_sample_value("dpo_operator_dpojob_rewards_accuracies", sample) is None
    assert forgotten == [(NS, NAME)], "its log followers are stopped"
    reconciler.events.stop()


def test_a_runtime_fix_replaces_a_job_whose_trainer_never_started_and_keeps_one_that_did() -> None:
    """ImagePullBackOff, then the image is fixed: the Job is re-created with it at once (no suspend needed). Once
    the trainer runs, a runtime edit keeps the Job (it applies from the next run or a resume)."""
    from test_kueue import NAME, NS, settle

    cluster, reconciler = in_memory_cluster()
    settle(cluster, reconciler)
    first = cluster.job()
    pod = cluster.start_pod("Pending", {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}})
    settle(cluster, reconciler)
    assert cluster.dpojob["status"]["conditions"][0]["reason"] == "ImagePullBackOff"

    cluster.dpojob["spec"]["runtime"]["image"] = "registry.example.com/dpo-trainer:0.1.0"
    cluster.dpojob["metadata"]["generation"] += 1
    cluster.feed(reconciler.cache)
    reconciler.reconcile(NS, NAME)
    assert f"delete {first['metadata']['name']}" in cluster.job_writes and ("Job", first["metadata"]["name"]) not in (
        cluster.objects
    )
    del cluster.objects["Pod", pod["metadata"]["name"]]  # the Job's pod goes with it
    settle(cluster, reconciler)
    replaced = cluster.job()
    assert replaced["metadata"]["name"] == first["metadata"]["name"], "the same run"
    assert replaced["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/dpo-trainer:0.1.0"
    assert any(reason == "JobReplaced" for _, reason, _ in cluster.events)

    cluster.start_pod("Running", {"running": {"startedAt": "2026-12-02T00:00:03Z"}})
    settle(cluster, reconciler)
    writes = list(cluster.job_writes)
    cluster.dpojob["spec"]["runtime"]["memory"] = "64Gi"
    cluster.dpojob["metadata"]["generation"] += 1
    settle(cluster, reconciler)
    assert cluster.job_writes == writes, "a started trainer's Job is kept"
    reconciler.events.stop()


def test_a_deterministic_trainer_failure_fails_the_run_at_once_and_stops_the_job() -> None:
    """A server without podFailurePolicy (1.20) would retry a refused token backoffLimit times: the operator fails
    the run at the first such pod and sets the Job's parallelism to 0. A kernel OOM kill keeps its retries."""
    from test_kueue import settle

    cluster, reconciler = in_memory_cluster()
    settle(cluster, reconciler)
    oom = {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    pod = cluster.start_pod("Failed", oom)
    settle(cluster, reconciler)
    assert cluster.dpojob["status"]["phase"] != "Failed" and cluster.job()["spec"].get("parallelism") == 1

    message = json.dumps({"reason": "HubAuthError", "message": "the Hub refused the token (401)"})
    pod["status"]["containerStatuses"][0]["state"] = {
        "terminated": {"exitCode": 5, "reason": "Error", "message": message}
    }
    settle(cluster, reconciler)
    status = cluster.dpojob["status"]
    assert status["phase"] == "Failed"
    assert status["reason"] == "HubAuthError" and next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert cluster.job()["spec"]["parallelism"] == 0, "no second pod: the Job is stopped"
    reconciler.events.stop()


def test_podless_jobs_of_a_namespace_share_one_failed_create_listing() -> None:
    class Events:
        listings = 0

        def failed_creates(self, namespace: str) -> dict[str, str]:
            self.listings += 1
            return {"uid-1": "exceeded quota"}

    def job(uid: str, age: float) -> dict[str, Any]:
        created = (datetime.now(UTC) - timedelta(seconds=age)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"metadata": {"namespace": "ns", "uid": uid, "creationTimestamp": created}}

    events = Events()
    errors = PodCreationErrors(events)  # type: ignore[arg-type]
    assert errors.lookup(job("uid-1", 60)) == ("exceeded quota", 0.0)
    assert errors.lookup(job("uid-2", 60)) == (None, 0.0)
    assert events.listings == 1, "one listing answers every Job of the namespace"
    message, retry_in = errors.lookup(job("uid-3", 9))  # its grace ends after that listing was taken
    assert message is None and 0 < retry_in <= PodCreationErrors.REFRESH_S and events.listings == 1
    errors.REFRESH_S = 0.0
    assert errors.lookup(job("uid-3", 9)) == (None, 0.0) and events.listings == 2, "taken again when allowed"


def test_an_output_directory_off_the_pods_writable_volumes_is_refused_even_with_a_hub_output() -> None:
    """The trainer pod's root filesystem is read-only: a model copied anywhere but onto one of its writable volumes
    would fail after the whole training, so the spec is refused before any pod, naming the field and the way out."""
    base = {**SPEC, "output": {"hub": {"repoId": "org/m"}}}
    output_volume = {"outputVolume": {"claimName": "models"}}
    refused = [
        ({"directory": "/models/m"}, {}),
        ({"directory": "model"}, {}),
        ({"directory": "/output/m"}, {}),  # no output volume there
        ({"directory": "/output/m"}, {"outputVolume": {"claimName": "models", "readOnly": True}}),
        ({"directory": "/data/m"}, {"dataVolume": {"claimName": "data", "readOnly": True}}),
        ({"directory": "/tmp/../etc/m"}, {}),
    ]
    for output, runtime in refused:
        spec = {**base, "output": {**base["output"], **output}, "runtime": runtime}
        _, error = validate_spec(spec)
        assert error is not None and error.startswith("spec.output.directory:"), (output, runtime, error)
        assert "spec.runtime.outputVolume" in error and "read-only" in error
    accepted = [
        ({"directory": "/output/m"}, output_volume),
        ({"directory": "/output"}, output_volume),
        ({"directory": "/tmp/model"}, {}),  # scratch: lost with the pod, but the Hub has the model
        ({"directory": "/checkpoints/final"}, {}),
        ({"directory": "/data/m"}, {"dataVolume": {"claimName": "data"}}),
    ]
    for output, runtime in accepted:
        spec = {**base, "output": {**base["output"], **output}, "runtime": runtime}
        assert validate_spec(spec)[1] is None, (output, runtime)


def test_a_read_only_checkpoint_volume_is_refused() -> None:
    spec = {**SPEC, "runtime": {"checkpointVolume": {"claimName": "work", "readOnly": True}}}
    _, error = validate_spec(spec)
    assert error is not None and error.startswith("spec.runtime.checkpointVolume.readOnly")
