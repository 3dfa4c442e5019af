"""API faults: the operator talks to the API server through a proxy that, for a minute, answers with 500s,
429s with Retry-After, dropped connections and 30 s stalls (dpo_dev/api_proxy.py). It must back off, never
crash, and bring every DPOJob to its end once the faults stop.

The chart installs the CRD, RBAC and ServiceAccount (with no replicas); the operator runs as a local process
under that ServiceAccount, its kubeconfig pointing at the proxy.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dpo_dev.api_proxy import ApiProxy
from dpo_dev.cluster import write_sa_kubeconfig
from dpo_dev.nodesim import Outcome
from dpo_dev.stack import (
    OPERATOR_ACCOUNT,
    OPERATOR_NAMESPACE,
    OperatorDeployment,
    OperatorProcess,
    kubectl,
)

COUNT = int(os.environ.get("DPO_FAULTS_COUNT", "12"))
FAULT_SECONDS = int(os.environ.get("DPO_FAULTS_SECONDS", "60"))
TOLERATE_FIXTURE_NODES = [{"key": "nodesim.dpo.dev/fixture", "operator": "Exists", "effect": "NoSchedule"}]
pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def operator_behind_proxy(
    admin_kubeconfig: Path, node_simulator: object, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ApiProxy, OperatorProcess, int]]:
    workdir = tmp_path_factory.mktemp("faults")
    chart = OperatorDeployment(admin_kubeconfig, node_simulator, workdir)
    chart.install({"replicas": 0})
    config = yaml.safe_load(admin_kubeconfig.read_text())
    server = config["clusters"][0]["cluster"]["server"]
    ca = workdir / "ca.crt"
    ca.write_bytes(_ca_pem(config["clusters"][0]["cluster"]))
    proxy = ApiProxy(server, ca, workdir / "proxy").start()
    kubeconfig = write_sa_kubeconfig(admin_kubeconfig, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, workdir / "sa.yaml")
    sa = yaml.safe_load(kubeconfig.read_text())
    sa["clusters"][0]["cluster"] = {"server": proxy.url, "insecure-skip-tls-verify": True}
    kubeconfig.write_text(yaml.safe_dump(sa))
    port = free_port()
    env = {
        "DPO_OPERATOR_RESYNC_SECONDS": "5",
        "DPO_OPERATOR_LISTEN_ADDRESS": "127.0.0.1",
        "DPO_OPERATOR_PORT": str(port),
    }
    operator = OperatorProcess(kubeconfig, workdir / "operator.log", env)
    operator.start()
    try:
        yield proxy, operator, port
    finally:
        operator.stop()
        proxy.stop()
        chart.uninstall()


def _ca_pem(cluster: dict) -> bytes:
    if "certificate-authority-data" in cluster:
        return base64.b64decode(cluster["certificate-authority-data"])
    return Path(cluster["certificate-authority"]).read_bytes()


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status
    except OSError:
        return 0


def test_every_dpojob_converges_after_a_minute_of_api_faults(
    operator_behind_proxy, node_simulator, namespace: str, api_client: object, admin_kubeconfig: Path
) -> None:
    from kubernetes import client

    proxy, operator, port = operator_behind_proxy
    assert proxy.port, "the proxy serves"
    deadline = time.monotonic() + 60
    while health(port) != 200:
        assert time.monotonic() < deadline, operator.logs()[-3000:]
        time.sleep(0.5)

    def finish(pod: dict, container: str, restarts: int) -> Outcome | None:
        if pod["metadata"]["namespace"] != namespace:
            return None
        name = pod["metadata"]["annotations"]["dpo-operator.io/dpojob-name"]
        return Outcome(duration_s=20, message=json.dumps({"reason": "Succeeded", "model": {"repoId": f"d/{name}"}}))

    custom = client.CustomObjectsApi(api_client)

    def apply(index: int) -> None:
        document = {
            "apiVersion": "dpo-operator.io/v1alpha1",
            "kind": "DPOJob",
            "metadata": {"name": f"faulty-{index}", "namespace": namespace},
            "spec": {
                "output": {"hub": {"repoId": f"d/faulty-{index}"}},
                "runtime": {
                    "gpus": 0,
                    "cpu": "100m",
                    "memory": "64Mi",
                    "scratchSize": "100Mi",  # the node's disk holds them all at once (the pods write nothing)
                    "workDirSize": "100Mi",
                    "tolerations": TOLERATE_FIXTURE_NODES,
                },
            },
        }
        kubectl(admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(document))

    with node_simulator.scripted(finish):
        # Faults start once the operator works (its first DPOJob has a status): a fault during Kopf's start-up
        # discovery ends the process by design (the kubelet restarts it); this test is about a running operator.
        apply(0)
        while not (
            custom.get_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs", "faulty-0").get(
                "status"
            )
            or {}
        ).get("phase"):
            assert time.monotonic() < deadline + 60, operator.logs()[-3000:]
            time.sleep(0.5)
        proxy.faults.set()
        started = time.monotonic()
        for index in range(1, COUNT):
            apply(index)
            time.sleep(FAULT_SECONDS / COUNT / 2)
        time.sleep(max(0.0, FAULT_SECONDS - (time.monotonic() - started)))
        assert operator.process is not None and operator.process.poll() is None, (
            "the operator must not crash: " + operator.logs()[-4000:]
        )
        proxy.faults.clear()
        recovered = time.monotonic()
        deadline = recovered + 240
        while time.monotonic() < deadline:
            items = custom.list_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs")["items"]
            if sum((i.get("status") or {}).get("phase") == "Succeeded" for i in items) == COUNT:
                break
            time.sleep(2)
    phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
    reasons = {
        i["metadata"]["name"]: [c.get("message") for c in (i.get("status") or {}).get("conditions") or []][:1]
        for i in items
    }
    assert set(phases.values()) == {"Succeeded"}, (phases, reasons)
    print(f"injected: {dict(proxy.injected)}; all converged {time.monotonic() - recovered:.0f}s after the faults")
    assert all(proxy.injected[fault] > 0 for fault in ("500", "429", "drop", "stall"))
    jobs = client.BatchV1Api(api_client).list_namespaced_job(namespace).items
    assert len(jobs) == COUNT, "one Job per DPOJob, whatever the API did"
    assert health(port) == 200, "healthy again: no background loop died"
