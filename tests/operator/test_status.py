"""Computing status and events from observed Jobs and pods (no cluster)."""

import json
from datetime import UTC, datetime

from dpo_operator.kube import merge_patch
from dpo_operator.status import Observed, compute_status, transition_events

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
    return compute_status(old or {}, Observed(generation=1, run=RUN, now=NOW, **kwargs))


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


def test_running_pod_means_running() -> None:
    status = observe(job=job(active=1), pods=[pod("p1", "Running", running={})])
    assert status["phase"] == "Running"
    assert condition(status, "Running")["status"] == "True"
    assert condition(status, "Ready") == {**condition(status, "Ready"), "status": "False", "reason": "Running"}
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


def test_trainer_reason_code_becomes_the_failure_reason() -> None:
    failure = {"reason": "HubAuthError", "message": "token rejected by the Hub"}
    failed = pod("p2", "Failed", "2026-01-01T00:01:00Z", terminated={"exitCode": 5, "message": json.dumps(failure)})
    first = pod("p1", "Failed", terminated={"exitCode": 1, "reason": "OOMKilled"})
    status = observe(job=job(failed=2, conditions=[{"type": "Failed", "status": "True"}]), pods=[first, failed])
    assert status["phase"] == "Failed" and status["retries"] == 2
    assert condition(status, "Failed")["reason"] == "HubAuthError"
    assert "token rejected" in condition(status, "Failed")["message"]


def test_oom_killed_is_out_of_memory() -> None:
    oom = pod("p1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})
    status = observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[oom])
    assert condition(status, "Failed")["reason"] == "OutOfMemory"


def test_pending_problems_are_reported() -> None:
    unschedulable = pod("p1", "Pending")
    unschedulable["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes: Insufficient gpu"}
    ]
    status = observe(job=job(active=1), pods=[unschedulable])
    assert status["phase"] == "Pending" and condition(status, "Ready")["reason"] == "Unschedulable"
    pull = pod("p1", "Pending", waiting={"reason": "ImagePullBackOff", "message": "no such image"})
    assert condition(observe(job=job(active=1), pods=[pull]), "Ready")["reason"] == "ImagePullBackOff"


def test_invalid_spec_and_suspend() -> None:
    invalid = observe(spec_error="spec.output.directory: not on a volume")
    assert invalid["phase"] == "Failed" and condition(invalid, "Failed")["reason"] == "InvalidSpec"
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
    )
    assert condition(later, "Running")["lastTransitionTime"] == condition(running, "Running")["lastTransitionTime"]
    assert merge_patch(running, later) == {}, "an unchanged observation must not patch"


def test_progress_from_the_log_is_used_and_carried() -> None:
    fields = {"stage": "dpo", "progress": {"step": 3, "totalSteps": 10, "percent": 60}, "rewards": {"margins": 0.2}}
    running = observe(job=job(active=1), pods=[pod("p1", "Running", running={})], progress=fields)
    assert running["stage"] == "dpo" and running["rewards"] == {"margins": 0.2}
    carried = compute_status(running, Observed(generation=2, run=RUN, now=NOW, job=job(active=1), pods=[]))
    assert carried["rewards"] == {"margins": 0.2} and carried["observedGeneration"] == 2


def test_a_new_run_archives_the_previous_one() -> None:
    message = json.dumps({"reason": "Succeeded", "metrics": {"rewards/margins": 1.0}, "model": {"repoId": "o/m"}})
    done = pod("p1", "Succeeded", terminated={"exitCode": 0, "message": message})
    finished = observe(job=job(conditions=[{"type": "Complete", "status": "True"}]), pods=[done])
    new_run = {"generation": 4, "specHash": "def"}
    status = compute_status(finished, Observed(generation=4, run=new_run, now=NOW))
    assert status["phase"] == "Pending" and "rewards" not in status and status["run"] == new_run
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
    retried = observe(job=job(active=1, failed=1), pods=[pod("p2", "Running", "2026-01-01T00:05:00Z", running={})])
    retried["stage"] = "sft"
    assert [e.reason for e in transition_events(running, retried)] == ["Retrying"]
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
    assert status["phase"] == "Failed" and condition(status, "Failed")["reason"] == "DeadlineExceeded"


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
    assert later["phase"] == "Succeeded" and condition(later, "Succeeded")["reason"] == "Succeeded"
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
    status = compute_status(finished, Observed(generation=2, run={"generation": 2, "specHash": "def"}, now=NOW))
    assert status["runs"][0]["model"] == model and "model" not in status


def test_a_failed_quality_gate_fails_the_run_with_the_numbers() -> None:
    failure = {
        "reason": "QualityGateFailed",
        "message": "eval rewards/accuracies 0.41 < minEvalRewardAccuracy 0.6 (not pushed; the merged model is in /o)",
    }
    failed = pod("p1", "Failed", terminated={"exitCode": 9, "message": json.dumps(failure)})
    status = observe(job=job(failed=1, conditions=[{"type": "Failed", "status": "True"}]), pods=[failed])
    assert status["phase"] == "Failed"
    assert condition(status, "Failed")["reason"] == condition(status, "Ready")["reason"] == "QualityGateFailed"
    [event] = [e for e in transition_events({}, status) if e.type == "Warning"]
    assert (event.reason, event.message) == ("QualityGateFailed", failure["message"])


def test_a_refused_child_is_invalid_spec_for_422_and_create_rejected_for_403() -> None:
    invalid = observe(rejected=(422, "the API server refused the trainer Job j-g1 (422): spec.x: Invalid value"))
    assert invalid["phase"] == "Failed" and condition(invalid, "Failed")["reason"] == "InvalidSpec"
    assert condition(invalid, "Failed")["message"].startswith("the API server refused the trainer Job")
    forbidden = observe(rejected=(403, "the API server refused the trainer Job j-g1 (403): exceeded quota"))
    assert forbidden["phase"] == "Pending" and condition(forbidden, "Ready")["reason"] == "CreateRejected"
