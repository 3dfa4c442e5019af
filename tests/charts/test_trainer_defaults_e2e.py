"""The chart's cluster-wide trainer defaults, end to end on the local control plane: a DPOJob with no runtime
fields runs with them (image, tolerations, nodeSelector, priorityClassName, pod labels and annotations), while a
DPOJob that sets its own keeps it; the operator logs JSON lines and serves its build and work-queue metrics.

The trainer pods are scripted to run until deleted (a default annotation of the node simulator's), so the test
waits for scheduling and the Running phase only, not for a training run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpo_dev.nodesim.model import ANNOTATION_PREFIX
from dpo_dev.stack import LocalStack, kubectl, quickstart_for_cluster

NS = "defaults-e2e"
MIRROR = "mirror.example.internal/dpo/trainer"
PRIORITY_CLASS = "dpo-e2e-training"
TOLERATION = {"key": "example.com/training", "operator": "Exists", "effect": "NoSchedule"}
NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # the simulated node's label: the pod still schedules
DEFAULTS = {
    "image": {"repository": MIRROR, "tag": "e2e"},
    "tolerations": [TOLERATION],
    "nodeSelector": NODE_SELECTOR,
    "priorityClassName": PRIORITY_CLASS,
    "labels": {"team": "ml-platform"},
    # The node simulator runs a pod so annotated for an hour instead of starting the trainer (and pulls nothing).
    "annotations": {f"{ANNOTATION_PREFIX}duration": "3600", "example.com/cost-center": "42"},
}
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def stack(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    kubectl(
        admin_kubeconfig,
        "apply",
        "-f",
        "-",
        stdin=yaml.safe_dump(
            {
                "apiVersion": "scheduling.k8s.io/v1",
                "kind": "PriorityClass",
                "metadata": {"name": PRIORITY_CLASS},
                "value": 1000,
            }
        ),
    )
    values = {"trainerDefaults": DEFAULTS, "logFormat": "json", "leaderElection": {"enabled": False}}
    try:
        with LocalStack(admin_kubeconfig, tmp_path_factory.mktemp("defaults-stack"), values=values) as stack:
            stack.create_token_secret(NS)
            yield stack
    finally:
        kubectl(admin_kubeconfig, "delete", "priorityclass", PRIORITY_CLASS, "--ignore-not-found", check=False)


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise TimeoutError(f"{what} not reached in {timeout}s")


def dpojob(name: str, runtime: dict[str, Any] | None) -> dict[str, Any]:
    document = quickstart_for_cluster(NS, name=name, repo=f"demo/{name}")
    document["spec"].pop("runtime", None)
    if runtime is not None:
        document["spec"]["runtime"] = runtime
    return document


def trainer_pod(stack: LocalStack, name: str) -> dict[str, Any] | None:
    raw = kubectl(stack.admin_kubeconfig, "-n", NS, "get", "pods", "-l", f"dpo-operator.io/dpojob={name}", "-o", "json")
    pods = json.loads(raw)["items"]
    return pods[0] if pods else None


def phase(stack: LocalStack, name: str) -> str | None:
    return (stack.get_dpojob(NS, name).get("status") or {}).get("phase")


def test_a_dpojob_with_no_runtime_fields_runs_with_the_charts_defaults(stack: LocalStack) -> None:
    kubectl(stack.admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(dpojob("bare", None)))
    pod = wait(lambda: trainer_pod(stack, "bare"), 60, "the trainer pod")
    spec, metadata = pod["spec"], pod["metadata"]
    assert spec["containers"][0]["image"] == f"{MIRROR}:e2e", "the chart's image, not the API's built-in one"
    assert TOLERATION in spec["tolerations"] and spec["nodeSelector"] == NODE_SELECTOR
    assert spec["priorityClassName"] == PRIORITY_CLASS
    assert metadata["labels"]["team"] == "ml-platform" and metadata["labels"]["dpo-operator.io/dpojob"] == "bare"
    assert metadata["annotations"]["example.com/cost-center"] == "42"
    wait(lambda: phase(stack, "bare") == "Running", 60, "phase Running")
    assert trainer_pod(stack, "bare")["spec"]["nodeName"] == "gpu-node-0"


def test_what_a_dpojob_sets_wins(stack: LocalStack) -> None:
    runtime = {"image": "ghcr.io/dpo-operator/trainer:0.1.0", "tolerations": [], "gpus": 0, "cpu": "1", "memory": "1Gi"}
    kubectl(stack.admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(dpojob("own", runtime)))
    pod = wait(lambda: trainer_pod(stack, "own"), 60, "the trainer pod")
    assert pod["spec"]["containers"][0]["image"] == "ghcr.io/dpo-operator/trainer:0.1.0"
    assert TOLERATION not in (pod["spec"].get("tolerations") or []), "an explicit empty list opts out"
    assert pod["spec"]["nodeSelector"] == NODE_SELECTOR, "what it does not set still comes from the chart"


def test_the_operator_logs_json_lines_and_serves_build_and_queue_metrics(stack: LocalStack) -> None:
    lines = [json.loads(line) for line in stack.operator.logs().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    started = next(line for line in lines if line["message"].startswith("dpo-operator "))
    assert '"log_format": "json"' in started["message"] and MIRROR in started["message"]
    pod = stack.operator.pods()[0]
    code, text = stack.operator.get(pod, "/metrics")
    assert code == 200
    assert "dpo_operator_build_info{version=" in text and 'dpo_operator_workqueue_depth{lane="urgent"}' in text
    assert "process_resident_memory_bytes" in text
    for name in ("bare", "own"):
        kubectl(stack.admin_kubeconfig, "-n", NS, "delete", "dpojob", name, "--wait=false")
