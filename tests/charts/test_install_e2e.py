"""The chart installed for real on the local control plane; the node simulator runs the operator's pods.

In file order, on one release: two replicas elect a leader; the quickstart DPOJob trains (the real trainer)
while the leader is SIGKILLed and the standby takes over; `helm upgrade` rolls the operator mid-run; the
release moves to namespaced RBAC; `helm uninstall` leaves the CRD and the DPOJobs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpo_dev.stack import RELEASE, LocalStack, kubectl, quickstart_for_cluster

NS = "helm-e2e"
OTHER_NS = "helm-e2e-unwatched"
TAKEOVER_LIMIT_S = 30
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(admin_kubeconfig, tmp_path_factory.mktemp("helm-stack"), replicas=2, resync_seconds=5) as stack:
        stack.create_token_secret(NS)
        kubectl(admin_kubeconfig, "create", "namespace", OTHER_NS, check=False)
        yield stack


def apply(stack: LocalStack, document: dict) -> None:
    kubectl(stack.admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(document))


def status_of(stack: LocalStack, name: str, namespace: str = NS) -> dict[str, Any]:
    return stack.get_dpojob(namespace, name).get("status") or {}


def job_names(stack: LocalStack, name: str) -> list[str]:
    raw = kubectl(stack.admin_kubeconfig, "-n", NS, "get", "jobs", "-l", f"dpo-operator.io/dpojob={name}", "-o", "json")
    return [j["metadata"]["name"] for j in json.loads(raw)["items"]]


def wait(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text; fails the test when the series is missing."""
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


def long_quickstart(name: str) -> dict:
    document = quickstart_for_cluster(NS, name=name, repo=f"demo/{name}")
    document["spec"]["dpo"].update(maxSteps=600, loggingSteps=5)  # ~45 s of DPO: room for a takeover midway
    return document


def test_install_gives_two_ready_replicas_and_one_leader(stack: LocalStack) -> None:
    pods = stack.operator.pods()
    assert len(pods) == 2
    for pod in pods:
        ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True", f"{pod['metadata']['name']} is not Ready"
        assert stack.operator.get(pod, "/healthz")[0] == 200
    names = {p["metadata"]["name"] for p in pods}
    # A Lease left by an earlier release (same name) names a gone pod until it expires.
    wait(lambda: stack.operator.leader() in names, 40, "a leader among this release's pods")
    assert "credentials: in-cluster service account" in stack.operator.logs(), "the chart's pod, not a kubeconfig"


def test_standby_takes_over_from_a_killed_leader_with_one_job_and_live_status(stack: LocalStack) -> None:
    apply(stack, long_quickstart("failover"))
    in_dpo = wait(
        lambda: (s := status_of(stack, "failover")).get("stage") == "dpo" and s.get("rewards") and s,
        240,
        "DPO with rewards in status",
    )
    leader = stack.operator.leader()
    leader_pod = next(p for p in stack.operator.pods() if p["metadata"]["name"] == leader)
    code, text = stack.operator.get(leader_pod, "/metrics")
    assert code == 200
    assert metric(text, "dpo_operator_trainer_jobs_created_total") >= 1
    assert metric(text, "dpo_operator_reconcile_total") > 0
    assert metric(text, "dpo_operator_reconcile_duration_seconds_count") > 0
    assert metric(text, "dpo_operator_status_patch_duration_seconds_count") > 0
    assert metric(text, "dpo_operator_job_creation_delay_seconds_count") >= 1
    assert metric(text, "dpo_operator_log_followers") >= 1
    assert metric(text, "dpo_operator_dpojobs", '{phase="Running"}') >= 1
    assert metric(text, "dpo_operator_leader") == 1
    labels = f'{{name="failover",namespace="{NS}"}}'

    def gauge_matches_status() -> bool:
        # Training goes on meanwhile: compare a gauge and a status read together, until one pair agrees.
        gauge = metric(stack.operator.get(leader_pod, "/metrics")[1], "dpo_operator_dpojob_rewards_accuracies", labels)
        return gauge == (status_of(stack, "failover").get("rewards") or {}).get("accuracies")

    assert in_dpo["rewards"]["accuracies"] is not None
    wait(gauge_matches_status, 30, "the rewards/accuracies gauge equal to status")

    stack.operator.kill(leader)
    killed_at = time.monotonic()
    jobs_seen: set[int] = set()

    def new_leader() -> str | None:
        jobs_seen.add(len(job_names(stack, "failover")))
        holder = stack.operator.leader()
        return holder if holder and holder != leader else None

    successor = wait(new_leader, TAKEOVER_LIMIT_S + 5, "a new leader")
    takeover_s = time.monotonic() - killed_at
    print(f"takeover after SIGKILL of the leader: {takeover_s:.1f}s")
    assert takeover_s <= TAKEOVER_LIMIT_S
    step_at_takeover = (status_of(stack, "failover").get("progress") or {}).get("step", 0)
    wait(
        lambda: (status_of(stack, "failover").get("progress") or {}).get("step", 0) > step_at_takeover,
        60,
        f"progress after the takeover by {successor}",
    )
    final = wait(
        lambda: (s := status_of(stack, "failover")).get("phase") in ("Succeeded", "Failed") and s, 300, "the end"
    )
    jobs_seen.add(len(job_names(stack, "failover")))
    assert final["phase"] == "Succeeded", final.get("conditions")
    assert jobs_seen == {1}, "exactly one trainer Job throughout"
    successor_pod = next(p for p in stack.operator.pods() if p["metadata"]["name"] == successor)
    text = stack.operator.get(successor_pod, "/metrics")[1]
    assert metric(text, "dpo_operator_dpojobs", '{phase="Succeeded"}') >= 1


def test_helm_upgrade_rolls_the_operator_without_losing_or_duplicating_the_run(stack: LocalStack) -> None:
    apply(stack, long_quickstart("upgrade"))
    wait(lambda: status_of(stack, "upgrade").get("phase") == "Running", 240, "upgrade Running")
    before = {p["metadata"]["name"] for p in stack.operator.pods()}
    stack.operator.install(stack.chart_values(resyncSeconds=6))
    after = {p["metadata"]["name"] for p in stack.operator.pods()}
    assert after and not after & before, "every operator pod was replaced by the rollout"
    final = wait(
        lambda: (s := status_of(stack, "upgrade")).get("phase") in ("Succeeded", "Failed") and s, 300, "the end"
    )
    assert final["phase"] == "Succeeded", final.get("conditions")
    assert job_names(stack, "upgrade") == ["upgrade-g1"] and not final.get("runs"), "one run, one Job"


def test_namespaced_mode_manages_only_its_namespaces(stack: LocalStack) -> None:
    stack.operator.install(stack.chart_values(watchNamespaces=[NS]))
    watched, unwatched = long_quickstart("parked"), long_quickstart("parked")
    watched["spec"]["suspend"] = unwatched["spec"]["suspend"] = True
    unwatched["metadata"]["namespace"] = OTHER_NS
    apply(stack, watched)
    apply(stack, unwatched)
    wait(lambda: status_of(stack, "parked").get("phase") == "Suspended", 60, "the watched DPOJob reconciled")
    time.sleep(10)  # a few resyncs (every 6 s) of the namespaced operator
    assert status_of(stack, "parked", OTHER_NS) == {}, "a DPOJob outside watchNamespaces is left untouched"
    logs = stack.operator.logs()
    assert "Forbidden" not in logs and " 403" not in logs, "no permission errors for unwatched namespaces"


def test_uninstall_keeps_the_crd_and_the_dpojobs(stack: LocalStack) -> None:
    stack.operator.uninstall()
    assert kubectl(stack.admin_kubeconfig, "get", "crd", "dpojobs.dpo-operator.io", "-o", "name").strip()
    names = kubectl(stack.admin_kubeconfig, "-n", NS, "get", "dpo", "-o", "name").split()
    assert {"dpojob.dpo-operator.io/failover", "dpojob.dpo-operator.io/upgrade"} <= set(names)
    assert not stack.operator.pods()
    assert RELEASE not in kubectl(stack.admin_kubeconfig, "-n", stack.operator.namespace, "get", "deploy")
