"""kstatus, as Flux, Config Sync and `kubectl`-free tooling built on cli-utils read a DPOJob: computed from real
status documents (dpo_operator.status.compute_status) with cli-utils' generic rules, ported below.

cli-utils (sigs.k8s.io/cli-utils/pkg/kstatus/status, Compute and checkGenericProperties) decides a custom
resource's status from its generic properties alone: Terminating while metadata.deletionTimestamp is set;
InProgress while status.observedGeneration differs from metadata.generation; then the first condition that is
Reconciling=True (InProgress) or Stalled=True (Failed); otherwise Current. A failed run must be Failed, not an
InProgress that a `flux` or `kpt live apply` waits on until its timeout.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from dpo_operator.status import Observed, compute_status

RUN = {"generation": 2, "specHash": "abc"}
NOW = datetime(2026, 1, 1, tzinfo=UTC)
CURRENT, IN_PROGRESS, FAILED, TERMINATING = "Current", "InProgress", "Failed", "Terminating"


def kstatus(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) by cli-utils' generic rules (status.Compute for a kind without built-in rules)."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return TERMINATING, "Resource scheduled for deletion"
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    if generation is not None and observed is not None and observed != generation:
        return IN_PROGRESS, f"{obj['kind']} generation is {generation}, but latest observed generation is {observed}"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Reconciling" and condition.get("status") == "True":
            return IN_PROGRESS, condition.get("message", "")
        if condition.get("type") == "Stalled" and condition.get("status") == "True":
            return FAILED, condition.get("message", "")
    return CURRENT, "Resource is current"


def job(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "llama-g2"}, "status": status}


def pod(phase: str, **state: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "llama-g2-abcde", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {"phase": phase, "containerStatuses": [{"state": state}] if state else []},
    }


def dpojob(generation: int = 2, **observed: Any) -> dict[str, Any]:
    """A DPOJob as the API server holds it, its status computed from this observation by the operator."""
    status = compute_status({}, Observed(generation=2, run=RUN, now=NOW, **observed)).to_document()
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": "llama", "namespace": "ml", "generation": generation},
        "status": status,
    }


SUCCESS = {"reason": "Succeeded", "model": {"repoId": "org/m", "revision": "main"}}
FAILURE = {"reason": "HubAuthError", "message": "token rejected by the Hub"}
OBSERVATIONS: dict[str, tuple[dict[str, Any], str, str]] = {
    "pending": ({"job": job(active=1), "pods": [pod("Pending")]}, "Pending", IN_PROGRESS),
    "running": ({"job": job(active=1), "pods": [pod("Running", running={})]}, "Running", IN_PROGRESS),
    "succeeded": (
        {
            "job": job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]),
            "pods": [pod("Succeeded", terminated={"exitCode": 0, "message": json.dumps(SUCCESS)})],
        },
        "Succeeded",
        CURRENT,
    ),
    "failed": (
        {
            "job": job(failed=1, conditions=[{"type": "Failed", "status": "True"}]),
            "pods": [pod("Failed", terminated={"exitCode": 5, "message": json.dumps(FAILURE)})],
        },
        "Failed",
        FAILED,
    ),
    "invalid-spec": ({"spec_error": "spec.output.directory: not on a volume"}, "Failed", FAILED),
    "suspended": ({"suspended": True}, "Suspended", CURRENT),
}


@pytest.mark.parametrize(("observed", "phase", "expected"), OBSERVATIONS.values(), ids=OBSERVATIONS.keys())
def test_kstatus_of_each_phase(observed: dict[str, Any], phase: str, expected: str) -> None:
    obj = dpojob(**observed)
    assert obj["status"]["phase"] == phase
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert kstatus(obj)[0] == expected


def test_a_failed_run_is_failed_with_the_reason_people_act_on() -> None:
    status, message = kstatus(dpojob(**OBSERVATIONS["failed"][0]))
    assert status == FAILED and "token rejected by the Hub" in message


def test_a_spec_edit_not_yet_acted_on_is_in_progress_whatever_the_conditions_say() -> None:
    succeeded = dpojob(generation=3, **OBSERVATIONS["succeeded"][0])
    assert kstatus(succeeded) == (IN_PROGRESS, "DPOJob generation is 3, but latest observed generation is 2")


def test_a_deleted_dpojob_is_terminating() -> None:
    obj = dpojob(**OBSERVATIONS["running"][0])
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:05:00Z"
    assert kstatus(obj)[0] == TERMINATING


def test_a_dpojob_without_status_yet_is_current_by_the_generic_rules() -> None:
    """cli-utils' own answer for a custom resource with no status at all (the port keeps its gaps too)."""
    assert kstatus({"kind": "DPOJob", "metadata": {"generation": 1}})[0] == CURRENT
