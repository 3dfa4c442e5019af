"""Bounded work per DPOJob, on the real control plane: one trainer pod prints 1,000 progress lines a second
while 20 quiet DPOJobs run. The noisy DPOJob's status is written at most once a second and still shows its
newest progress within about a second; every quiet DPOJob's status and Events arrive on time.

The chart installs the CRD and RBAC (no replicas); the operator runs as a local process under its
ServiceAccount, watching the test's namespace. The node simulator plays every pod; the test writes the noisy
pod's log itself (its simulated container's log file, which the simulator's kubelet endpoint streams through
the API server to the operator's follower). Status writes are counted from a watch of the noisy DPOJob: the
operator is its only writer, and each write is one MODIFIED event.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from urllib3.exceptions import ProtocolError

from dpo_dev.cluster import write_sa_kubeconfig
from dpo_dev.nodesim import Outcome
from dpo_dev.stack import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, OperatorDeployment, OperatorProcess, kubectl

NOISY, QUIET = "noisy", 20
LINES_PER_S, NOISY_S = 1000, 12
QUIET_RUN_S = 6.0
QUIET_DEADLINE_S = 40.0
"""From applying the quiet DPOJobs to all of them Succeeded: scheduling, a 6 s run, status."""
TOLERATE_FIXTURE_NODES = [{"key": "nodesim.dpo.dev/fixture", "operator": "Exists", "effect": "NoSchedule"}]
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def operator(
    admin_kubeconfig: Path, node_simulator: object, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    chart = OperatorDeployment(admin_kubeconfig, node_simulator, tmp_path)
    chart.install({"replicas": 0})
    kubeconfig = write_sa_kubeconfig(admin_kubeconfig, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, tmp_path / "sa.yaml")
    env = {"DPO_OPERATOR_NAMESPACES": namespace, "DPO_OPERATOR_LISTEN_ADDRESS": "127.0.0.1", "DPO_OPERATOR_PORT": "0"}
    process = OperatorProcess(kubeconfig, tmp_path / "operator.log", env, verbose=False)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        chart.uninstall()


def dpojob(namespace: str, name: str) -> dict:
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "output": {"hub": {"repoId": f"d/{name}"}},
            "runtime": {
                "gpus": 0,
                "cpu": "10m",
                "memory": "64Mi",
                "scratchSize": "100Mi",
                "workDirSize": "100Mi",
                "tolerations": TOLERATE_FIXTURE_NODES,
            },
        },
    }


def progress_line(step: int, since: float) -> bytes:
    """A hostile trainer's line: a new step and a later time (by 1 ms: lines of one time would be skipped as
    already read) each time, the stage flapping between SFT and DPO."""
    stage = ("sft", "dpo")[step // 300 % 2]
    event = {"kind": "dpo-trainer/progress", "event": "log", "stage": stage, "step": step, "totalSteps": 10**6}
    return json.dumps({**event, "time": since + step / LINES_PER_S}).encode() + b"\n"


def test_a_pod_printing_1000_progress_lines_a_second_gets_one_status_write_a_second_and_others_keep_flowing(
    operator: OperatorProcess, node_simulator, namespace: str, api_client: object, admin_kubeconfig: Path
) -> None:
    from kubernetes import client, watch

    custom, core = client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)

    def outcome(pod: dict, container: str, restarts: int) -> Outcome | None:
        if pod["metadata"]["namespace"] != namespace:
            return None
        name = pod["metadata"]["annotations"]["dpo-operator.io/dpojob-name"]
        if name == NOISY:
            return Outcome(duration_s=NOISY_S + 60)  # ends with the test's namespace
        return Outcome(duration_s=QUIET_RUN_S, message=json.dumps({"reason": "Succeeded", "model": {"repoId": name}}))

    def status(name: str) -> dict:
        return (
            custom.get_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs", name).get("status")
            or {}
        )

    def wait_for(what: str, predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"{what}; operator log: {operator.logs()[-3000:]}"
            time.sleep(0.2)

    with node_simulator.scripted(outcome):
        kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(dpojob(namespace, NOISY)))
        wait_for("the noisy DPOJob runs", lambda: status(NOISY).get("phase") == "Running", 120)
        pod = core.list_namespaced_pod(namespace, label_selector=f"dpo-operator.io/dpojob={NOISY}").items[0]
        logfile = node_simulator.runner(namespace, pod.metadata.name).container("trainer").logs[-1]

        writes: list[float] = []
        version = custom.get_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs", NOISY)[
            "metadata"
        ]["resourceVersion"]

        watched_until: list[float] = []

        def count_writes() -> None:
            with contextlib.suppress(ProtocolError):  # how the API server may end a watch at its timeout
                for event in watch.Watch().stream(
                    custom.list_namespaced_custom_object,
                    "dpo-operator.io",
                    "v1alpha1",
                    namespace,
                    "dpojobs",
                    field_selector=f"metadata.name={NOISY}",
                    resource_version=version,
                    timeout_seconds=NOISY_S + 5,
                ):
                    if event["type"] == "MODIFIED":
                        writes.append(time.monotonic())
            watched_until.append(time.monotonic())

        threading.Thread(target=count_writes, daemon=True).start()
        quiet = [dpojob(namespace, f"quiet-{i:02d}") for i in range(QUIET)]
        kubectl(
            admin_kubeconfig,
            "apply",
            "-f",
            "-",
            stdin=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": quiet}),
        )
        started, since, step = time.monotonic(), time.time() - 1, 0
        while (elapsed := time.monotonic() - started) < NOISY_S:
            while step < elapsed * LINES_PER_S:
                step += 1
                logfile.write(progress_line(step, since))
            time.sleep(0.005)
        ended = time.monotonic()
        wait_for("the last line reaches status", lambda: status(NOISY).get("progress", {}).get("step") == step, 10)
        latency = time.monotonic() - ended
        time.sleep(max(0.0, ended + 2 - time.monotonic()))  # a write due after the last line still counts
        counted = [t for t in writes if started <= t <= ended + 2]
        wait_for("the watch ends", lambda: watched_until, 30)
        assert watched_until[0] >= ended + 2, "the watch saw the whole window"
        print(
            f"noisy: {step} lines in {NOISY_S} s -> {len(counted)} status writes in {NOISY_S + 2} s "
            f"({len(counted) / (NOISY_S + 2):.2f}/s); the last line in status {latency:.2f} s after it was written"
        )
        assert len(counted) <= NOISY_S + 2, f"{len(counted)} status writes in {NOISY_S + 2} s: at most one a second"
        assert latency <= 2.5, "the newest progress reaches status within about a second (plus the log's polling)"

        def quiet_done() -> bool:
            items = custom.list_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs")["items"]
            return sum((i.get("status") or {}).get("phase") == "Succeeded" for i in items) == QUIET

        wait_for("every quiet DPOJob succeeded on time", quiet_done, started + QUIET_DEADLINE_S - time.monotonic())

    def reasons(name: str) -> set[str]:
        raw = kubectl(admin_kubeconfig, "-n", namespace, "get", "events", "-o", "json",
                      f"--field-selector=involvedObject.name={name}")  # fmt: skip
        return {e["reason"] for e in json.loads(raw)["items"]}

    for index in range(QUIET):
        name = f"quiet-{index:02d}"
        wait_for(f"{name}'s Events", lambda: {"JobCreated", "Succeeded"} <= reasons(name), 5)  # noqa: B023
