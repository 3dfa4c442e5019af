"""Computing status and events from observed Jobs and pods (no cluster), and the status documents stored."""

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from dpo_dev.crd import CRD_FILE
from dpo_operator.kube import merge_patch
from dpo_operator.status import Observed, compute_status, transition_events
from dpojob_api.status import Condition, DPOJobStatus, Progress, run_identity

ROOT = Path(__file__).resolve().parents[2]

RUN = {"generation": 1, "specHash": "abc"}
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(**status) -> dict:
    return {"metadata": {"name": "j-g1"}, "status": status}


def pod(name: str, phase: str, created: str = "2026-01-01T00:00:00Z", **container_state) -> dict:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"phase": phase, "containerStatuses": [{"state": container_state}] if container_state else []},
    }


def observe(old: dict | None = None, **kwargs) -> dict:
    """The status document the operator stores for this observation of run RUN."""
    return compute_status(old or {}, Observed(generation=1, run=RUN, now=NOW, **kwargs)).to_document()


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_running_pod_means_running() -> None:
    status = observe(job=job(active=1), pods=[pod("p1", "Running", running={})])
    assert status["phase"] == "Running"
    assert condition(status, "Reconciling")["status"] == "True" and "reason" not in status, "Running says it all"
    assert condition(status, "Ready") == {**condition(status, "Ready"), "status": "Unknown", "reason": "Running"}
    assert [c["type"] for c in status["conditions"]] == ["Ready", "Reconciling"], "only Ready and what is True"
    assert status["trainer"] == {"jobName": "j-g1", "configMapName": "j-g1", "podName": "p1"}
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


def test_success_takes_model_and_final_metrics_from_the_termination_message() -> None:
    message = {
        "reason": "Succeeded",
        "metrics": {"rewards/accuracies": 0.75, "rewards/margins": 0.4, "loss": 0.5},
        "model": {"repoId": "org/m", "revision": "main", "commitUrl": "http://hub/commit/1"},
    }
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": json.dumps(message)})
    status = observe(job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    assert status["phase"] == "Succeeded" and condition(status, "Ready")["status"] == "True"
    assert status["rewards"] == {"accuracies": 0.75, "margins": 0.4}
    assert status["model"]["commitUrl"] == "http://hub/commit/1"
    assert status["progress"]["percent"] == 100 and status["completionTime"]


def test_a_completed_job_whose_pod_is_not_seen_succeeded_yet_is_not_final() -> None:
    """The Job's watch can deliver Complete before the pod's watch delivers Succeeded: a final status written then
    would freeze without the model location (the chaos test saw it)."""
    still_running = pod("p1", "Running", running={})
    status = observe(job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), pods=[still_running])
    assert (status["phase"], status["reason"]) == ("Running", "Completing") and not status.get("completionTime")


def test_trainer_reason_code_becomes_the_failure_reason() -> None:
    failure = {"reason": "HubAuthError", "message": "token rejected by the Hub"}
    failed = pod("p2", "Failed", "2026-01-01T00:01:00Z", terminated={"exitCode": 5, "message": json.dumps(failure)})
    first = pod("p1", "Failed", terminated={"exitCode": 1, "reason": "OOMKilled"})
    status = observe(job=job(failed=2, conditions=[{"type": "Failed", "status": "True"}]), pods=[first, failed])
    assert status["phase"] == "Failed" and status["retries"] == 1, "two pods failed: the first was retried"
    assert condition(status, "Stalled")["reason"] == "HubAuthError"
    assert "token rejected" in condition(status, "Stalled")["message"]


def test_oom_killed_is_out_of_memory() -> None:
    oom = pod("p1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    status = observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[oom])
    assert condition(status, "Stalled")["reason"] == "OutOfMemory"


def test_pending_problems_are_reported() -> None:
    unschedulable = pod("p1", "Pending")
    unschedulable["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: Insufficient gpu"}
    ]
    status = observe(job=job(active=1), pods=[unschedulable])
    assert status["phase"] == "Pending" and condition(status, "Ready")["reason"] == "Unschedulable"
    assert status["reason"] == "Unschedulable" and "fix spec.runtime" in condition(status, "Ready")["message"]
    pull = pod("p1", "Pending", waiting={"reason": "ImagePullBackOff", "message": "no such image"})
    assert condition(observe(job=job(active=1), pods=[pull]), "Ready")["reason"] == "ImagePullBackOff"


def test_invalid_spec_and_suspend() -> None:
    invalid = observe(spec_error="spec.output.directory: not on a volume")
    assert invalid["phase"] == "Failed" and condition(invalid, "Stalled")["reason"] == "InvalidSpec"
    assert invalid["reason"] == "InvalidSpec" and condition(invalid, "Ready")["status"] == "False"
    suspended = observe(suspended=True)
    assert suspended["phase"] == "Suspended" and condition(suspended, "Suspended")["status"] == "True"


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    running = observe(job=job(active=1), pods=[pod("p1", "Running", running={})])
    later = compute_status(
        running,
        Observed(
            generation=1,
            run=RUN,
            now=datetime(2026, 1, 2, tzinfo=UTC),
            job=job(active=1),
            pods=[pod("p1", "Running", running={})],
        ),
    ).to_document()
    assert (
        condition(later, "Reconciling")["lastTransitionTime"] == condition(running, "Reconciling")["lastTransitionTime"]
    )
    assert merge_patch(running, later) == {}, "an unchanged observation must not patch"


def test_progress_from_the_log_is_used_and_carried() -> None:
    fields = {"stage": "dpo", "progress": {"step": 3, "totalSteps": 10, "percent": 60}, "rewards": {"margins": 0.2}}
    running = observe(job=job(active=1), pods=[pod("p1", "Running", running={})], progress=fields)
    assert running["stage"] == "dpo" and running["rewards"] == {"margins": 0.2}
    carried = compute_status(
        running, Observed(generation=2, run=RUN, now=NOW, job=job(active=1), pods=[])
    ).to_document()
    assert carried["rewards"] == {"margins": 0.2} and carried["observedGeneration"] == 2


def test_a_new_run_archives_the_previous_one() -> None:
    message = json.dumps({"reason": "Succeeded", "metrics": {"rewards/margins": 1.0}, "model": {"repoId": "o/m"}})
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": message})
    finished = observe(job=job(conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    new_run = {"generation": 4, "specHash": "def"}
    status = compute_status(finished, Observed(generation=4, run=new_run, now=NOW)).to_document()
    assert status["phase"] == "Pending" and "rewards" not in status and status["run"] == {"generation": 4}
    assert status["internal"] == {"specHash": "def"}, "bookkeeping out of the user's way"
    assert status["runs"][0]["phase"] == "Succeeded" and status["runs"][0]["model"] == {"repoId": "o/m"}
    assert status["runs"][0]["generation"] == 1
    reasons = [e.reason for e in transition_events(finished, status)]
    assert reasons == ["NewRun"], "waiting for the new Job is routine: no Pending event"


def test_events_for_stage_retry_and_finish() -> None:
    pending = observe(job=job(active=1), pods=[])
    running = observe(job=job(active=1), pods=[pod("p1", "Running", running={})], progress={"stage": "sft"})
    assert [(e.type, e.reason) for e in transition_events(pending, running)] == [
        ("Normal", "StageStarted"),
        ("Normal", "Running"),
    ]
    crashed = pod("p1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    retried = observe(
        job=job(active=1, failed=1), pods=[crashed, pod("p2", "Running", "2026-01-01T00:05:00Z", running={})]
    )
    retried["stage"] = "sft"
    (event,) = transition_events(running, retried)
    assert event.reason == "Retrying" and "p1: OutOfMemory: the trainer container was OOMKilled" in event.message, (
        "the Event says why the pod failed"
    )
    failure = json.dumps({"reason": "DatasetError", "message": "column response_j missing"})
    failed = observe(
        job=job(failed=3, conditions=[{"type": "Failed", "status": "True"}]),
        pods=[pod("p3", "Failed", terminated={"exitCode": 3, "message": failure})],
    )
    failed["stage"] = "sft"
    events = transition_events(retried, failed)
    assert events[-1].type == "Warning" and events[-1].reason == "DatasetError"
    assert "response_j" in events[-1].message
    assert transition_events(failed, failed) == []


def test_leaving_suspend_is_a_resume() -> None:
    suspended = observe(suspended=True)
    pending = observe(suspended, job=None)
    assert [e.reason for e in transition_events(suspended, pending)] == ["Resumed"]


def test_deadline_exceeded_is_the_failure_reason() -> None:
    deadline = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "Job was active longer"}
    running_pod = pod("p1", "Failed", terminated={"exitCode": 143, "message": '{"reason": "Interrupted"}'})
    status = observe(job=job(failed=1, conditions=[deadline]), pods=[running_pod])
    assert status["phase"] == "Failed" and condition(status, "Stalled")["reason"] == "DeadlineExceeded"


def test_invalid_spec_is_not_final() -> None:
    """InvalidSpec can be fixed through runtime (same run): the run must then start."""
    invalid = observe(spec_error="spec.output.directory: not on a volume")
    fixed = observe(invalid, job=job(active=1), pods=[pod("p1", "Running", running={})])
    assert fixed["phase"] == "Running" and "completionTime" not in fixed


def test_a_replayed_log_does_not_move_status_backwards() -> None:
    later = {"stage": "dpo", "progress": {"step": 8, "updatedAt": "2026-01-01T00:00:09.500Z"}}
    earlier = {"stage": "data", "progress": {"step": 0, "updatedAt": "2026-01-01T00:00:01.000Z"}}
    running = {"job": job(active=1), "pods": [pod("p1", "Running", running={})]}
    current = observe(progress=later, **running)
    replayed = observe(current, progress=earlier, **running)
    assert replayed["stage"] == "dpo" and replayed["progress"]["step"] == 8


def test_a_finished_run_is_frozen() -> None:
    message = json.dumps({"reason": "Succeeded", "metrics": {"rewards/margins": 0.5}})
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": message})
    finished = observe(job=job(conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    late = {"rewards": {"margins": 0.1}, "progress": {"updatedAt": "2030-01-01T00:00:00.000Z"}}
    assert observe(finished, progress=late, job=None)["rewards"] == {"margins": 0.5}


def test_waiting_for_a_previous_job_is_reported() -> None:
    status = observe(waiting="a trainer Job of the same name is being garbage-collected")
    assert condition(status, "Ready")["reason"] == "WaitingForCleanup"
    assert [e.type for e in transition_events({}, status)] == ["Warning"]


def test_a_finished_run_stays_finished_when_its_spec_turns_invalid() -> None:
    """A runtime edit (or a stricter operator after an upgrade) must not flip a Succeeded run to Failed."""
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": '{"reason": "Succeeded"}'})
    finished = observe(job=job(conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    later = observe(finished, spec_error="spec.output.directory: not on a persistent volume", job=None)
    assert later["phase"] == "Succeeded" and condition(later, "Ready") == condition(finished, "Ready")
    assert later["completionTime"] == finished["completionTime"]


def test_a_pod_the_job_controller_cannot_create_is_the_pending_reason() -> None:
    error = 'pods "j-g1-x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1, limited: 0'
    status = observe(job=job(), pod_creation_error=error)
    assert status["phase"] == "Pending" and condition(status, "Ready")["reason"] == "FailedCreate"
    assert "exceeded quota" in condition(status, "Ready")["message"]
    assert [(e.type, e.reason) for e in transition_events({}, status)] == [("Warning", "FailedCreate")]


def test_the_pushed_revision_and_tag_survive_into_the_run_history() -> None:
    """What users pin (commit, branch, the run's tag) stays in status.runs after the next run starts."""
    model = {
        "directory": "/checkpoints/m-g1/model",
        "repoId": "org/m",
        "revision": "main",
        "tag": "run-g1",
        "commitUrl": "https://huggingface.co/org/m/commit/abc",
        "commitSha": "abc",
    }
    message = json.dumps({"reason": "Succeeded", "metrics": {"eval_rewards/accuracies": 0.8}, "model": model})
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": message})
    finished = observe(job=job(conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    assert finished["model"] == model
    assert transition_events({}, finished)[-1].message == f"training finished; merged model at {model['commitUrl']}"
    new_run = Observed(generation=2, run={"generation": 2, "specHash": "def"}, now=NOW)
    status = compute_status(finished, new_run).to_document()
    assert status["runs"][0]["model"] == model and "model" not in status


def test_a_failed_quality_gate_fails_the_run_with_the_numbers() -> None:
    failure = {
        "reason": "QualityGateFailed",
        "message": "eval rewards/accuracies 0.41 < minEvalRewardAccuracy 0.6 (not pushed; the merged model is in /o)",
    }
    failed = pod("p1", "Failed", terminated={"exitCode": 9, "message": json.dumps(failure)})
    status = observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[failed])
    assert status["phase"] == "Failed"
    assert condition(status, "Stalled")["reason"] == condition(status, "Ready")["reason"] == "QualityGateFailed"
    [event] = [e for e in transition_events({}, status) if e.type == "Warning"]
    assert (event.reason, event.message) == ("QualityGateFailed", failure["message"])


def test_a_refused_child_is_invalid_spec_for_422_and_create_rejected_for_403() -> None:
    invalid = observe(rejected=(422, "the API server refused the trainer Job j-g1 (422): spec.x: Invalid value"))
    assert invalid["phase"] == "Failed" and condition(invalid, "Stalled")["reason"] == "InvalidSpec"
    assert invalid["reason"] == "InvalidSpec" and condition(invalid, "Ready")["status"] == "False"
    assert condition(invalid, "Stalled")["message"].startswith("the API server refused the trainer Job")
    forbidden = observe(rejected=(403, "the API server refused the trainer Job j-g1 (403): exceeded quota"))
    assert forbidden["phase"] == "Pending" and condition(forbidden, "Ready")["reason"] == "CreateRejected"


def succeeded() -> dict:
    """A run that pushed its model, with progress, metrics, retries and the Job's content hash."""
    model = {"directory": "/o/m", "repoId": "org/m", "revision": "main", "tag": "run-g1", "commitSha": "abc"}
    metrics = {"rewards/margins": 0.4, "loss": 1, "eval_rewards/accuracies": 0.75}
    message = json.dumps({"reason": "Succeeded", "metrics": metrics, "model": model})
    done = pod("p2", "Succeeded", "2026-01-01T00:05:00Z", terminated={"exitCode": 0, "message": message})
    complete = job(failed=1, startTime="2026-01-01T00:00:01Z", conditions=[{"type": "Complete", "status": "True"}])
    progress = {"stage": "dpo", "progress": {"step": 9, "totalSteps": 10, "percent": 90, "etaSeconds": 4}}
    return observe(job=complete, pods=[done], progress=progress)


def test_status_documents_validate_against_the_crd_status_schema() -> None:
    """What the operator writes is what the CRD declares (the server would prune or refuse anything else)."""
    crd = yaml.safe_load((ROOT / CRD_FILE).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    finished = succeeded()
    retry = {"generation": 1, "specHash": "abc", "attempt": 1, "retryToken": "t1"}
    documents = [
        finished,
        compute_status(finished, Observed(generation=2, run=retry, now=NOW)).to_document(),
        observe(job=job(active=1), pods=[pod("p1", "Pending", waiting={"reason": "ErrImagePull"})]),
        observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[pod("p1", "Failed")]),
        observe(suspended=True),
        observe(spec_error="spec.output.directory: not on a volume"),
        observe(
            job=job(active=1),
            pods=[pod("p1", "Running", running={})],
            progress={
                **_rule_progress({"rule": "noted", "action": "warn", "reason": "MetricRule"}),
                "efficiency": {"dpo": {"seconds": 12.5, "gpuHours": 0.01, "stepsPerSecond": 1.5}},
                "provenance": {"model": "org/base@main", "modelSha": "a" * 40, "datasets": [], "libraries": {}},
                "preflight": {"estimatedGiB": {"dpo": 10.6}, "gpuMemoryGiB": 79.2},
                "sftModel": {"digest": "0123456789abcdef", "source": "reused", "from": "ns/a", "message": "m"},
            },
        ),
    ]
    written = {key for document in documents for key in document}
    assert written == set(schema["properties"]), "the documents must exercise every status field"
    validator = jsonschema.Draft4Validator(schema)
    for document in documents:
        assert not [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)], document


def test_a_status_document_holds_only_what_was_observed() -> None:
    """No default-valued fields the operator did not write: each one would be a status patch of its own."""
    assert observe(job=job(active=1), pods=[]) == {
        "observedGeneration": 1,
        "run": {"generation": 1},
        "internal": {"specHash": "abc"},
        "runs": [],
        "phase": "Pending",
        "reason": "PodCreating",
        "conditions": [
            {
                "type": kind,
                "status": status,
                "reason": "PodCreating",
                "message": "waiting for the Job controller to create the trainer pod",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "observedGeneration": 1,
            }
            for kind, status in (("Ready", "Unknown"), ("Reconciling", "True"))
        ],
        "trainer": {"jobName": "j-g1", "configMapName": "j-g1"},
        "retries": 0,
    }


def test_fields_written_by_another_operator_version_are_kept() -> None:
    """A status read, recomputed and compared back must not patch away what this version does not know."""
    running = observe(job=job(active=1), pods=[pod("p1", "Running", running={})], progress={"stage": "dpo"})
    running["progress"] = {"percent": 50, "tokensPerSecond": 900}
    running["runs"] = [{"generation": 0, "specHash": "old", "phase": "Failed", "message": "from an older version"}]
    later = observe(running, job=job(active=1), pods=[pod("p1", "Running", running={})])
    assert merge_patch(running, later) == {}


def test_the_document_is_camel_case_and_holds_only_what_was_set() -> None:
    status = DPOJobStatus(phase="Running", run={"generation": 1}, progress=Progress(step=3, eta_seconds=None))
    assert status.to_document() == {"phase": "Running", "run": {"generation": 1}, "progress": {"step": 3}}


def test_empty_strings_are_left_out_like_none() -> None:
    """The API server reads "" in a status back as null: writing it would differ from the stored status forever."""
    condition = Condition(type="Running", status="False", reason="NotRunning", message="", last_transition_time="t")
    assert DPOJobStatus(conditions=[condition]).to_document() == {
        "conditions": [{"type": "Running", "status": "False", "reason": "NotRunning", "lastTransitionTime": "t"}]
    }


def test_a_stored_status_reads_back_to_the_same_document() -> None:
    document = {
        "phase": "Succeeded",
        "retries": 0,
        "run": {"generation": 1, "attempt": 1},
        "internal": {"specHash": "abc"},
        "metrics": {"loss": 0.5},
        "progress": {"percent": 100, "tokensPerSecond": 900},
        "runs": [{**RUN, "phase": "Failed", "message": "a field of an older version"}],
        "futureField": {"kept": True},
    }
    assert DPOJobStatus.from_document(document).to_document() == document


def test_a_status_of_an_earlier_version_keeps_its_run_identity() -> None:
    """Before 0.2 status.run held the spec hash and retry token; they move to status.internal on read."""
    legacy = {"phase": "Failed", "run": {"generation": 2, "specHash": "abc", "attempt": 1, "retryToken": "t"}}
    read = DPOJobStatus.from_document(legacy).to_document()
    assert read["run"] == {"generation": 2, "attempt": 1}
    assert read["internal"] == {"specHash": "abc", "retryToken": "t"}
    assert run_identity(legacy) == run_identity(read) == legacy["run"]


def test_an_unreadable_value_is_left_out_with_its_field_or_list_item() -> None:
    """Another version's enum value must not fail every reconcile: the rest of the status is still read."""
    document = {
        "phase": "Running",
        "stage": "evaluate",
        "progress": {"step": "many"},
        "runs": [{**RUN, "phase": "Archived"}, {**RUN, "phase": "Succeeded"}],
    }
    assert DPOJobStatus.from_document(document).to_document() == {
        "phase": "Running",
        "runs": [{**RUN, "phase": "Succeeded"}],
    }


def test_assignments_are_validated() -> None:
    """The operator cannot build a status the CRD would refuse."""
    status = DPOJobStatus()
    with pytest.raises(ValidationError):
        status.phase = "Done"


def test_a_trainer_that_cannot_use_its_gpu_fails_the_run_with_gpu_unavailable() -> None:
    failure = {
        "reason": "GPUUnavailable",
        "message": "spec.runtime.gpus is 1 but torch cannot use CUDA: torch 2.13.0+cu130 is built for CUDA 13.0; "
        "NVIDIA driver 535.104.05; 0 CUDA devices visible; ...; or set spec.runtime.gpus: 0 to train on CPU",
    }
    failed = pod("p1", "Failed", terminated={"exitCode": 10, "message": json.dumps(failure)})
    status = observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[failed])
    assert status["phase"] == "Failed"
    assert condition(status, "Stalled")["reason"] == condition(status, "Ready")["reason"] == "GPUUnavailable"
    assert condition(status, "Stalled")["message"] == failure["message"]
    [event] = [e for e in transition_events({}, status) if e.type == "Warning"]
    assert (event.reason, event.message) == ("GPUUnavailable", failure["message"])


HOSTILE_TERMINATION_MESSAGES = [
    '{"reason": "TrainingError", "metrics": {"loss": 1e999, "rewards/margins": NaN}}',
    '{"reason": "TrainingError", "metrics": [1, 2]}',
    '{"reason": 7, "message": {"nested": true}, "metrics": "loss=1"}',
    '{"reason": "Succeeded", "model": {"repoId": ["org/m"], "commitUrl": "http://x\\nInjected", "tag": 3}}',
    '{"reason": "Succeeded", "model": {"directory": "' + "d" * 5000 + '", "commitSha": "abc", "evil": "x"}}',
    '{"reason": "not a reason!", "model": "org/m"}',
    '{"metrics": ' + "[" * 3000 + "]" * 3000 + "}",
    "[1, 2]",
    "Traceback (most recent call last): ...",
]


@pytest.mark.parametrize("message", HOSTILE_TERMINATION_MESSAGES)
@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_hostile_termination_message_never_blocks_the_status_write(message: str, phase: str) -> None:
    """Pod output is untrusted: whatever the trainer pod leaves, the run finishes with a status the API server
    takes (strict JSON, the CRD's schema), keeping only well-typed, finite, bounded fields."""
    crd = yaml.safe_load((ROOT / CRD_FILE).read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    finished = pod("p1", phase, terminated={"exitCode": 0 if phase == "Succeeded" else 1, "message": message})
    condition_type = "Complete" if phase == "Succeeded" else "Failed"
    status = observe(job=job(conditions=[{"type": condition_type, "status": "True"}]), pods=[finished])
    json.dumps(status, allow_nan=False)
    assert not list(jsonschema.Draft4Validator(schema).iter_errors(status))
    assert status["phase"] == phase and all(math.isfinite(v) for v in (status.get("metrics") or {}).values())
    model = status.get("model") or {}
    assert set(model) <= {"commitSha"} and model.get("commitSha", "abc") == "abc", "only one-line strings kept"
    assert re.fullmatch("[A-Z][A-Za-z]+", condition(status, "Ready")["reason"]), "a reason is one CamelCase word"


def test_a_failed_run_shows_the_stage_it_stopped_in() -> None:
    """The last progress published may lag the pod's end by up to a second: the termination message says where the
    trainer stopped."""
    failure = {"reason": "QualityGateFailed", "message": "eval rewards/margins 0.5 < 1000", "stage": "gates"}
    failed = pod("p1", "Failed", terminated={"exitCode": 9, "message": json.dumps(failure)})
    lagging = {"stage": "model_card", "progress": {"percent": 97}}
    status = observe(
        job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[failed], progress=lagging
    )
    assert status["stage"] == "gates" and status["reason"] == "QualityGateFailed"


def _rule_progress(*hits: dict) -> dict:
    """Status fields from a pod's log that reported these stop rules (as TrainerProgress.status_fields has them)."""
    return {"stage": "dpo", "rules": [{"stage": "dpo", "step": 10, "message": "m", **hit} for hit in hits]}


def test_a_warn_rule_is_a_condition_the_reason_while_running_and_one_warning_event() -> None:
    running = {"job": job(active=1), "pods": [pod("p1", "Running", running={})]}
    before = observe(**running)
    warn = {"rule": "likelihood-displacement", "action": "warn", "reason": "LikelihoodDisplacement"}
    status = observe(before, progress=_rule_progress(warn), **running)
    assert status["phase"] == "Running" and status["reason"] == "LikelihoodDisplacement"
    warning = condition(status, "MetricWarning")
    assert (warning["status"], warning["reason"], warning["message"]) == ("True", "LikelihoodDisplacement", "m")
    (event,) = [e for e in transition_events(before, status) if e.reason == "LikelihoodDisplacement"]
    assert event.type == "Warning" and event.message == "m"
    again = observe(status, progress=_rule_progress(warn), **running)
    assert not [e for e in transition_events(status, again) if e.reason == "LikelihoodDisplacement"], "posted once"
    assert condition(again, "MetricWarning")["lastTransitionTime"] == warning["lastTransitionTime"]


def test_rule_hits_of_earlier_pods_of_the_run_are_kept_and_a_finish_is_a_normal_event() -> None:
    running = {"job": job(active=1), "pods": [pod("p2", "Running", running={})]}
    first = observe(progress=_rule_progress({"rule": "noted", "action": "warn", "reason": "MetricRule"}), **running)
    finish = {"rule": "plateau", "action": "finish", "reason": "StoppedByRule", "step": 15}
    later = observe(first, progress=_rule_progress(finish), **running)  # a new pod: its log has the finish only
    assert [h["rule"] for h in later["rules"]] == ["noted", "plateau"]
    events = transition_events(first, later)
    assert [(e.type, e.reason) for e in events if e.reason in ("StoppedEarly", "MetricRule")] == [
        ("Normal", "StoppedEarly")
    ]


def test_a_fail_rule_fails_the_run_with_its_reason_from_the_termination_message() -> None:
    failure = {"reason": "StoppedByRule", "message": "dpo: stop rule always: loss > -1 (at step 10: 0.69)"}
    failed = pod("p1", "Failed", terminated={"exitCode": 12, "message": json.dumps(failure)})
    status = observe(job=job(failed=1), pods=[failed])
    assert (status["phase"], status["reason"]) == ("Failed", "StoppedByRule")
    assert "stop rule always" in condition(status, "Ready")["message"]


def test_the_trainer_image_is_recorded_by_digest() -> None:
    running = pod("p1", "Running", running={})
    running["status"]["containerStatuses"][0].update(
        name="trainer", imageID="docker.io/org/dpo-trainer@sha256:" + "c" * 64
    )
    status = observe(job=job(active=1), pods=[running])
    assert status["trainer"]["imageId"] == "docker.io/org/dpo-trainer@sha256:" + "c" * 64


def test_a_condition_keeps_within_metav1_condition_bounds() -> None:
    """An unschedulable message listing thousands of nodes is cut to metav1.Condition's 32768 characters (the model
    refuses more, and the API server would refuse the status write)."""
    problem = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/9999 nodes " * 4000}
    stuck = pod("p1", "Pending")
    stuck["status"]["conditions"] = [problem]
    status = observe(job=job(active=1), pods=[stuck])
    assert status["reason"] == "Unschedulable" and len(condition(status, "Ready")["message"]) == 32768
    with pytest.raises(ValidationError):
        Condition(type="Ready", status="True", reason="x" * 1025, last_transition_time="2026-01-01T00:00:00Z")


def test_the_summary_is_kept_and_may_arrive_after_the_outcome() -> None:
    """efficiency and provenance come with the trainer's last line: a final status written before the follower
    read it still takes them, and later observations without progress (an operator restart) keep them."""
    summary = {
        "efficiency": {"dpo": {"seconds": 12.5, "gpuHours": 0.01}},
        "provenance": {"model": "org/base@main", "datasets": [], "libraries": {"trl": "1.16.0"}},
    }
    finished = succeeded()
    assert "provenance" not in finished
    late = observe(
        finished, job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]), progress=summary
    )
    assert late["provenance"]["libraries"] == {"trl": "1.16.0"} and late["efficiency"]["dpo"]["seconds"] == 12.5
    restarted = observe(late, job=job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]))
    assert restarted["provenance"] == late["provenance"] and restarted["phase"] == "Succeeded"


def _sft_progress(source: str) -> dict:
    message = f"{source} 0123456789abcdef from team/sweep-a"
    return {"stage": "sft", "sftModel": {"digest": "0123456789abcdef", "source": source, "from": "team/sweep-a",
                                         "message": message}}  # fmt: skip


def test_waiting_for_a_shared_sft_model_is_the_reason_and_reusing_it_an_event() -> None:
    """Another DPOJob trains the same SFT model: REASON says WaitingForSFT (an Event says for whom); once it is
    published this run reuses it: one SFTReused Event, the reason cleared, status.sftModel kept for the run."""
    running = {"job": job(active=1), "pods": [pod("p1", "Running", running={})]}
    before = observe(**running)
    waiting = observe(before, progress=_sft_progress("waiting"), **running)
    assert (waiting["phase"], waiting["reason"]) == ("Running", "WaitingForSFT")
    assert waiting["sftModel"]["from"] == "team/sweep-a"
    assert [(e.type, e.reason) for e in transition_events(before, waiting) if "SFT" in e.reason] == [
        ("Normal", "WaitingForSFT")
    ]
    reused = observe(waiting, progress=_sft_progress("reused"), **running)
    assert "reason" not in reused and reused["sftModel"]["source"] == "reused"
    (event,) = [e for e in transition_events(waiting, reused) if "SFT" in e.reason]
    assert (event.type, event.reason) == ("Normal", "SFTReused") and "team/sweep-a" in event.message
    later = observe(reused, progress={"stage": "dpo"}, **running)
    assert later["sftModel"] == reused["sftModel"], "carried while the run lasts"
    assert not [e for e in transition_events(reused, later) if "SFT" in e.reason], "posted once"
