"""The local stack for the demo and the operator's end-to-end tests.

On top of a control plane (LocalCluster, or any cluster's admin kubeconfig): a local Hub, a simulated GPU
node, and the operator installed with `helm install` from charts/. The node simulator runs the operator's pod
from the chart's Deployment (in-cluster config from a projected ServiceAccount token, probes, its own pod IP)
as it runs the trainer pods (the real `dpo-trainer`): as local processes (``mode="process"``, fast), or as
containers of the real images built by `dpo-localcluster images` (``mode="container"``: read-only root,
uid 1000, no capabilities, memory limits). `install()` and `OperatorProcess` start the operator without the
chart (benchmarks/operator_scale.py).
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
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dpo_dev import crd
from dpojob_api.spec import RuntimeSpec

from .build import ensure_helm
from .hub import LocalHub
from .images import VERSION, ensure_images
from .nodesim import NodeSimConfig, NodeSimulator, NodeSpec

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "dpo-operator"
RELEASE = "dpo-operator"
OPERATOR_NAMESPACE = "dpo-operator-system"
OPERATOR_ACCOUNT = "dpo-operator"
HUB_USER = "demo"
# Trainers on the simulated node (through the chart's trainerEnv, in both modes): one thread each (2-core
# machines), offline except for the local Hub.
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

SMALL_GPU_TAINT = {"key": "dpo-operator.dev/small-gpu", "value": "true", "effect": "NoSchedule"}
SMALL_GPU_NODE = NodeSpec(
    "small-gpu-node",
    labels={"dpo-operator.dev/small-gpu": "true"},
    taints=[SMALL_GPU_TAINT],
    env={"DPO_GPU_MEMORY": "256Mi"},
)
"""A node whose GPU memory is 256 MiB as the trainer's preflight sees it (DPOJobs land there only by selecting
and tolerating it): a memory misfit found before training, on the control plane."""


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

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str], verbose: bool = True) -> None:
        """verbose: debug logging (tests read it); off, as the chart's default, for measurements."""
        self.kubeconfig, self.log, self.env, self.verbose = kubeconfig, log, env, verbose
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "KUBECONFIG": str(self.kubeconfig)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "dpo-operator"), *(["--verbose"] if self.verbose else [])],
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


def helm(kubeconfig: Path, *args: str, check: bool = True) -> str:
    """Run helm against the given kubeconfig; raise with its stderr when it fails and check is set."""
    result = subprocess.run(
        [str(ensure_helm()), "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout if result.returncode == 0 else result.stderr


class OperatorDeployment:
    """The operator as the Helm chart deploys it. Its pods run on the simulated node, so a test kills one the
    way a node would (SIGKILL of the container; the simulator restarts it as a kubelet does)."""

    def __init__(self, admin_kubeconfig: Path, simulator: NodeSimulator, workdir: Path) -> None:
        self.admin_kubeconfig, self.simulator, self.workdir = admin_kubeconfig, simulator, workdir
        self.namespace = OPERATOR_NAMESPACE

    def install(self, values: dict[str, Any], timeout: str = "180s") -> None:
        """`helm upgrade --install` with these values; returns once the Deployment has rolled out."""
        values_file = self.workdir / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        helm(
            self.admin_kubeconfig, "upgrade", "--install", RELEASE, str(CHART), "-n", self.namespace,
            "--create-namespace", "--wait", f"--timeout={timeout}", "-f", str(values_file),
        )  # fmt: skip

    def uninstall(self) -> None:
        helm(self.admin_kubeconfig, "uninstall", RELEASE, "-n", self.namespace, "--wait", check=False)

    def pods(self) -> list[dict[str, Any]]:
        """The release's pods that are not being deleted, oldest first."""
        listed = kubectl(
            self.admin_kubeconfig, "-n", self.namespace, "get", "pods", "-o", "json",
            "-l", f"app.kubernetes.io/instance={RELEASE}",
        )  # fmt: skip
        pods = [p for p in json.loads(listed)["items"] if not p["metadata"].get("deletionTimestamp")]
        return sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"])

    def leader(self) -> str | None:
        """The pod whose operator holds the leader Lease (None before anyone took it, or after a release)."""
        lease = kubectl(self.admin_kubeconfig, "-n", self.namespace, "get", "lease", RELEASE, "-o", "json", check=False)
        with contextlib.suppress(json.JSONDecodeError):
            holder = json.loads(lease)["spec"].get("holderIdentity")
            return holder.rsplit("_", 1)[0] if holder else None  # identity: <pod name>_<random suffix>
        return None

    def kill(self, pod: str, sig: int = signal.SIGKILL) -> None:
        """Signal the operator container in that pod (SIGKILL: a crash)."""
        runner = self.simulator.runner(self.namespace, pod)
        if runner is None:
            raise RuntimeError(f"pod {pod} is not on the simulated node")
        runner.signal(sig)

    def get(self, pod: dict[str, Any], path: str) -> tuple[int, str]:
        """HTTP GET on the operator's port at the pod's IP (/healthz, /readyz, /metrics)."""
        url = f"http://{pod['status']['podIP']}:8080{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def logs(self) -> str:
        """Every operator container's output so far (all pods, all restarts), as `kubectl logs` shows it."""
        files = sorted((self.simulator.workdir / "pods").glob(f"{self.namespace}_*/*/*.log"), key=os.path.getmtime)
        lines = []
        for path in files:
            for record in path.read_text(errors="replace").splitlines():
                lines.append(record.split(" ", 3)[-1] if record.count(" ") >= 3 else record)
        return "\n".join(lines)


class LocalStack:
    """Hub + simulated GPU node + the operator installed by its Helm chart, on the cluster of an admin kubeconfig.

    ``mode``: how the node runs pods, "process" (the local venv) or "container" (the images, built or loaded by
    start() with ensure_images; podman must work, nothing falls back).
    """

    def __init__(
        self,
        admin_kubeconfig: Path,
        workdir: Path | None = None,
        *,
        gpus: int = 1,
        resync_seconds: int = 5,
        replicas: int = 1,
        values: dict[str, Any] | None = None,
        mode: str = "process",
        progress: Callable[[str], None] = lambda message: None,
    ) -> None:
        if mode not in ("process", "container"):
            raise ValueError(f"mode must be 'process' or 'container', not {mode!r}")
        self.mode, self.progress = mode, progress
        self.admin_kubeconfig = Path(admin_kubeconfig)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dpo-stack-"))
        self.hub_token = "hf_" + secrets.token_hex(16)
        self.hub = LocalHub(self.workdir / "hub", {self.hub_token: HUB_USER})
        self.simulator = NodeSimulator(
            self.admin_kubeconfig,
            [
                NodeSpec("gpu-node-0", cpu="16", memory="128Gi", gpus=gpus, labels={"nvidia.com/gpu.present": "true"}),
                SMALL_GPU_NODE,
            ],
            config=NodeSimConfig(
                mode=mode,
                workdir=self.workdir / "node",
                cwd=REPO_ROOT,
                env=TRAINER_PROCESS_ENV,
                # DPOJobs name no image: the default (the project's published trainer) is the locally built one.
                preloaded_images={RuntimeSpec.model_fields["image"].default: f"localhost/dpo-trainer:{VERSION}"},
            ),
        )
        self.operator = OperatorDeployment(self.admin_kubeconfig, self.simulator, self.workdir)
        self.values = {"replicas": replicas, "resyncSeconds": resync_seconds, "verbose": True, **(values or {})}

    def chart_values(self, **overrides: Any) -> dict[str, Any]:
        """The chart values of this stack: the local image name, the Hub and process settings for trainers."""
        trainer_env = [{"name": k, "value": v} for k, v in {"HF_ENDPOINT": self.hub.url, **TRAINER_PROCESS_ENV}.items()]
        return {
            "image": {"repository": "dpo-operator"},
            "listenAddress": "$(POD_IP)",  # every simulated pod shares this machine's network namespace
            "trainerEnv": trainer_env,
            **self.values,
            **overrides,
        }

    def start(self) -> LocalStack:
        if self.mode == "container":  # the chart's dpo-operator:0.1.0 and the trainers' dpo-trainer:0.1.0
            ensure_images(self.progress)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.hub.start()
        try:
            self.simulator.start()
            self.operator.install(self.chart_values())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.operator.uninstall()
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
        tail = "\n".join(self.operator.logs().splitlines()[-40:])
        raise TimeoutError(f"{namespace}/{name} not there after {timeout}s: {obj.get('status')}\n{tail}")


def quickstart_for_cluster(namespace: str, name: str = "quickstart", repo: str = f"{HUB_USER}/tiny-dpo") -> dict:
    """examples/quickstart.yaml, pushing to the Hub with the token Secret (the model must leave the pod)."""
    document = yaml.safe_load((REPO_ROOT / "examples" / "quickstart.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": namespace}
    spec = document["spec"]
    spec["output"] = {"hub": {"repoId": repo, "private": True}}
    spec["hubTokenSecretRef"] = {"name": "hf-token", "key": "token"}
    return document
