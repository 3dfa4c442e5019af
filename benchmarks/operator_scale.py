"""How the operator keeps up with many DPOJobs, and what it costs in memory.

Starts the local control plane and the operator (under its ServiceAccount), then creates N DPOJobs twice:
suspended (the operator only validates and writes status) and running (it also creates a ConfigMap and a
Job each; pods stay Pending since no node is registered). Reported, per phase:

- create time: how long `kubectl apply` of N objects takes (the API server's own cost: the baseline);
- reconcile time: from the first create until every DPOJob's status reflects it;
- ratio reconcile/create: how much the operator lags behind the writes;
- operator RSS before and after (VmRSS of the process).

    .venv/bin/python benchmarks/operator_scale.py --count 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from dpo_dev.cluster import LocalCluster, write_sa_kubeconfig
from dpo_dev.stack import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, OperatorProcess, install, kubectl


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def documents(namespace: str, prefix: str, count: int, suspend: bool) -> str:
    items = [
        {
            "apiVersion": "dpo-operator.io/v1alpha1",
            "kind": "DPOJob",
            "metadata": {"name": f"{prefix}-{i}", "namespace": namespace},
            "spec": {"suspend": suspend, "output": {"hub": {"repoId": f"bench/model-{i}"}}},
        }
        for i in range(count)
    ]
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})


def wait_all(kubeconfig: Path, namespace: str, prefix: str, count: int, phase: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = json.loads(kubectl(kubeconfig, "-n", namespace, "get", "dpojobs", "-o", "json"))["items"]
        done = sum(
            1
            for item in items
            if item["metadata"]["name"].startswith(prefix + "-") and (item.get("status") or {}).get("phase") == phase
        )
        if done == count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{prefix}: not all {count} DPOJobs reached {phase}")


def measure(kubeconfig: Path, operator: OperatorProcess, prefix: str, count: int, suspend: bool) -> dict:
    namespace = f"bench-{prefix}"
    kubectl(kubeconfig, "create", "namespace", namespace)
    before = rss_mib(operator.process.pid)
    start = time.monotonic()
    kubectl(kubeconfig, "apply", "-f", "-", stdin=documents(namespace, prefix, count, suspend))
    created = time.monotonic() - start
    wait_all(kubeconfig, namespace, prefix, count, "Suspended" if suspend else "Pending", timeout=600)
    reconciled = time.monotonic() - start
    return {
        "phase": prefix,
        "count": count,
        "create_s": round(created, 2),
        "reconcile_s": round(reconciled, 2),
        "ratio": round(reconciled / created, 2),
        "per_object_ms": round(1000 * reconciled / count, 1),
        "rss_before_mib": round(before, 1),
        "rss_after_mib": round(rss_mib(operator.process.pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    with LocalCluster(workdir / "cluster") as cluster:
        install(cluster.kubeconfig)
        sa = write_sa_kubeconfig(
            cluster.kubeconfig, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, workdir / "operator.kubeconfig"
        )
        operator = OperatorProcess(sa, workdir / "operator.log", {"DPO_OPERATOR_RESYNC_SECONDS": "600"})
        operator.start()
        try:
            time.sleep(5)  # let Kopf connect; its idle footprint is the first RSS figure
            idle = rss_mib(operator.process.pid)
            results = [
                measure(cluster.kubeconfig, operator, "suspended", args.count, suspend=True),
                measure(cluster.kubeconfig, operator, "running", args.count, suspend=False),
            ]
        finally:
            operator.stop()
    print(json.dumps({"operator_idle_rss_mib": round(idle, 1), "results": results}, indent=2))


if __name__ == "__main__":
    main()
