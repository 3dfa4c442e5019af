"""The local stack for the demo and the operator's end-to-end tests.

On top of a control plane (LocalCluster, or any cluster's admin kubeconfig): a local Hub, a simulated GPU
node that runs trainer pods as local processes (the real `dpo-trainer`), the CRD and RBAC installed, and the
operator running as a separate process under its own ServiceAccount — the way it runs in a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .. import crd
from .cluster import write_sa_kubeconfig
from .hub import LocalHub
from .nodesim import NodeSimulator, NodeSpec

REPO_ROOT = Path(__file__).resolve().parents[3]
OPERATOR_NAMESPACE = "dpo-operator-system"
OPERATOR_ACCOUNT = "dpo-operator"
HUB_USER = "demo"
# Trainer processes on the simulated node: one thread each (2-core machines), offline except for the local Hub.
TRAINER_PROCESS_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_OFFLINE": "0",
    "TRANSFORMERS_OFFLINE": "0",
    "HF_DATASETS_OFFLINE": "1",
}


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, check: bool = True) -> str:
    """Run kubectl against the given kubeconfig; raise with its stderr when it fails and check is set."""
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args], input=stdin, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout if result.returncode == 0 else result.stderr


def install(admin_kubeconfig: Path) -> None:
    """Apply the CRD, the operator namespace and its RBAC; wait until the CRD is served."""
    kubectl(admin_kubeconfig, "apply", "-f", str(REPO_ROOT / crd.CRD_FILE))
    kubectl(admin_kubeconfig, "create", "namespace", OPERATOR_NAMESPACE, check=False)
    kubectl(admin_kubeconfig, "apply", "-f", str(REPO_ROOT / "operator" / "deploy" / "rbac.yaml"))
    kubectl(admin_kubeconfig, "wait", "--for=condition=Established", f"crd/{crd.CRD_NAME}", "--timeout=60s")


class OperatorProcess:
    """`dpo-operator` as a child process (so tests can kill and restart it like a pod)."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        self.kubeconfig, self.log, self.env = kubeconfig, log, env
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dpo-operator"), "--verbose"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop it (SIGKILL simulates a crash); waits for exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class LocalStack:
    """Hub + simulated GPU node + CRD/RBAC + operator, on the cluster of an admin kubeconfig."""

    def __init__(
        self,
        admin_kubeconfig: Path,
        workdir: Path | None = None,
        *,
        gpus: int = 1,
        resync_seconds: float = 5.0,
    ) -> None:
        self.admin_kubeconfig = Path(admin_kubeconfig)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dpo-stack-"))
        self.hub_token = "hf_" + secrets.token_hex(16)
        self.hub = LocalHub(self.workdir / "hub", {self.hub_token: HUB_USER})
        self.simulator = NodeSimulator(
            self.admin_kubeconfig,
            [NodeSpec("gpu-node-0", cpu="16", memory="128Gi", gpus=gpus, labels={"nvidia.com/gpu.present": "true"})],
            mode="process",
            workdir=self.workdir / "node",
            cwd=REPO_ROOT,
            env=TRAINER_PROCESS_ENV,
        )
        self.resync_seconds = resync_seconds
        self.operator: OperatorProcess | None = None

    def start(self) -> LocalStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hub.start()
        self.simulator.start()
        install(self.admin_kubeconfig)
        sa_kubeconfig = write_sa_kubeconfig(
            self.admin_kubeconfig, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, self.workdir / "operator.kubeconfig"
        )
        trainer_env = {"HF_ENDPOINT": self.hub.url, **TRAINER_PROCESS_ENV}
        self.operator = OperatorProcess(
            sa_kubeconfig,
            self.workdir / "operator.log",
            {
                "DPO_OPERATOR_TRAINER_ENV": json.dumps(trainer_env),
                "DPO_OPERATOR_RESYNC_SECONDS": str(self.resync_seconds),
            },
        )
        self.operator.start()
        return self

    def stop(self) -> None:
        if self.operator is not None:
            self.operator.stop()
        with contextlib.suppress(Exception):
            self.simulator.stop()
        self.hub.stop()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def create_token_secret(self, namespace: str, name: str = "hf-token") -> None:
        """The Hub token as a Secret the DPOJob references (spec.hubTokenSecretRef)."""
        kubectl(self.admin_kubeconfig, "create", "namespace", namespace, check=False)
        kubectl(self.admin_kubeconfig, "-n", namespace, "delete", "secret", name, "--ignore-not-found")
        kubectl(  # the token goes through stdin: a command line is visible to every process on the machine
            self.admin_kubeconfig, "-n", namespace, "create", "secret", "generic", name,
            "--from-file=token=/dev/stdin", stdin=self.hub_token,
        )  # fmt: skip

    def get_dpojob(self, namespace: str, name: str) -> dict[str, Any]:
        return yaml.safe_load(kubectl(self.admin_kubeconfig, "-n", namespace, "get", "dpojob", name, "-o", "yaml"))

    def wait_for(self, namespace: str, name: str, predicate: Any, timeout: float, poll: float = 1.0) -> dict:
        """Poll the DPOJob until predicate(obj) is true; raise with the last status and operator log otherwise."""
        deadline = time.monotonic() + timeout
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = self.get_dpojob(namespace, name)
            if predicate(obj):
                return obj
            time.sleep(poll)
        tail = "\n".join(self.operator.logs().splitlines()[-40:]) if self.operator else ""
        raise TimeoutError(f"{namespace}/{name} not there after {timeout}s: {obj.get('status')}\n{tail}")


def quickstart_for_cluster(namespace: str, name: str = "quickstart", repo: str = f"{HUB_USER}/tiny-dpo") -> dict:
    """examples/quickstart.yaml, pushing to the Hub with the token Secret (the model must leave the pod)."""
    document = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": namespace}
    spec = document["spec"]
    spec["output"] = {"hub": {"repoId": repo, "private": True}}
    spec["hubTokenSecretRef"] = {"name": "hf-token", "key": "token"}
    return document
