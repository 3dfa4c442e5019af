"""Shared fixtures: a real Kubernetes control plane (one per session), a node simulator, kubeconfigs, helm.

By default the session starts the local control plane (``dpo_dev.cluster.LocalCluster``; built into
the cache on first use). With ``USE_EXISTING_CLUSTER=1`` the same tests run against the current kubeconfig's
cluster (kind, k3d, a real one). A control plane that cannot start is an error, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Before any test imports torch/transformers: one thread per process and no network lookups on the Hub.
os.environ.update(
    OMP_NUM_THREADS="1",
    HF_HUB_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    TOKENIZERS_PARALLELISM="false",
)

FIXTURE_POOL_LABEL = "nodesim.dpo.dev/pool"
FIXTURE_TAINT = {"key": "nodesim.dpo.dev/fixture", "value": "true", "effect": "NoSchedule"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fetch/build the control plane (and helm) before the first test when any collected test needs them, so
    a cold build (minutes, once per machine) does not count against a test's timeout."""
    needed = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if session.config.option.collectonly or not needed & {"cluster", "helm"}:
        return
    from dpo_dev.build import ensure_binaries, ensure_helm

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(message: str) -> None:  # straight to the terminal: output capture would hide a long build
        if reporter is not None:
            reporter.write_line(f"[local cluster] {message}")

    if "cluster" in needed and os.environ.get("USE_EXISTING_CLUSTER") != "1":
        ensure_binaries(progress=say)
    if "helm" in needed:
        ensure_helm(progress=say)


@dataclass(frozen=True)
class ClusterHandle:
    """The session's cluster: its admin kubeconfig, and the LocalCluster when we started one."""

    kubeconfig: Path
    local: object | None  # dpo_dev.cluster.LocalCluster, None with USE_EXISTING_CLUSTER=1

    @property
    def existing(self) -> bool:
        return self.local is None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterHandle]:
    """The session's cluster; KUBECONFIG points at its admin kubeconfig while the session runs.

    Teardown stops every component by PID and fails if any process of theirs is left.
    """
    from dpo_dev.cluster import LocalCluster
    from dpo_dev.processes import processes_in_groups

    with pytest.MonkeyPatch.context() as env:
        if os.environ.get("USE_EXISTING_CLUSTER") == "1":
            path = tmp_path_factory.mktemp("existing-cluster") / "admin.kubeconfig"
            flat = subprocess.run(
                ["kubectl", "config", "view", "--minify", "--flatten", "--raw"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            path.write_text(flat)
            env.setenv("KUBECONFIG", str(path))
            yield ClusterHandle(path, None)
            return
        local = LocalCluster(tmp_path_factory.mktemp("local-cluster"))
        local.start()
        env.setenv("KUBECONFIG", str(local.kubeconfig))
        try:
            yield ClusterHandle(local.kubeconfig, local)
        finally:
            pids = list(local.pids().values())
            local.stop()
    left = processes_in_groups(pids)
    assert not left, f"control-plane processes left running: {left}"


@pytest.fixture(scope="session")
def admin_kubeconfig(cluster: ClusterHandle) -> Path:
    """Path of a kubeconfig with cluster-admin rights."""
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def api_client(admin_kubeconfig: Path) -> Iterator[object]:
    """A ``kubernetes.client.ApiClient`` with admin rights (pass it to ``client.CoreV1Api(api_client)``)."""
    from kubernetes import config

    with config.new_client_from_config(config_file=str(admin_kubeconfig)) as api:
        yield api


@pytest.fixture(scope="session")
def sa_kubeconfig(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """Factory: ``sa_kubeconfig(namespace, name)`` -> kubeconfig of that ServiceAccount (both created if missing).

    The token comes from the TokenRequest API, so the ServiceAccount has exactly the rights RBAC grants it.
    """
    from dpo_dev.cluster import write_sa_kubeconfig

    directory = tmp_path_factory.mktemp("sa-kubeconfigs")
    made: dict[tuple[str, str], Path] = {}

    def make(namespace: str, name: str) -> Path:
        if (namespace, name) not in made:
            path = directory / f"{namespace}.{name}.kubeconfig"
            made[namespace, name] = write_sa_kubeconfig(admin_kubeconfig, namespace, name, path)
        return made[namespace, name]

    return make


@pytest.fixture(scope="session")
def node_simulator(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A process-mode NodeSimulator with three fake nodes, all labelled ``nodesim.dpo.dev/pool=fixture``
    and tainted ``nodesim.dpo.dev/fixture=true:NoSchedule`` so that only pods meant for them (tolerating that
    taint) land there, even when another simulator shares the session's cluster:

    * ``sim-cpu-0``: 8 CPUs, 32Gi, no GPU;
    * ``sim-gpu-0``: 16 CPUs, 64Gi, 2 ``nvidia.com/gpu``;
    * ``sim-gpu-1``: 16 CPUs, 64Gi, 4 ``nvidia.com/gpu``, also tainted ``nvidia.com/gpu=present:NoSchedule``.

    Script outcomes per test with ``with node_simulator.scripted(rule): ...`` or pod annotations (see
    ``dpo_dev.nodesim``). ``DPO_NODESIM_ADDRESS`` sets the address the kubelet endpoint binds to and
    advertises (on kind, an address the apiserver container can reach). Teardown fails on leftover processes.
    """
    from dpo_dev.nodesim import NodeSimConfig, NodeSimulator, NodeSpec
    from dpo_dev.processes import processes_in_groups

    pool = {FIXTURE_POOL_LABEL: "fixture"}
    gpu = {**pool, "nvidia.com/gpu.present": "true"}
    nodes = [
        NodeSpec("sim-cpu-0", cpu="8", memory="32Gi", labels=dict(pool), taints=[FIXTURE_TAINT]),
        NodeSpec("sim-gpu-0", cpu="16", memory="64Gi", gpus=2, labels=dict(gpu), taints=[FIXTURE_TAINT]),
        NodeSpec("sim-gpu-1", cpu="16", memory="64Gi", gpus=4, labels=dict(gpu), taints=[FIXTURE_TAINT, GPU_TAINT]),
    ]
    simulator = NodeSimulator(
        admin_kubeconfig,
        nodes,
        config=NodeSimConfig(
            mode="process",
            workdir=tmp_path_factory.mktemp("nodesim"),
            address=os.environ.get("DPO_NODESIM_ADDRESS", "127.0.0.1"),
            max_grace_s=5.0,
        ),
    )
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()
    left = processes_in_groups(simulator.process_groups())
    assert not left, f"pod processes left running after the simulator stopped: {left}"


@pytest.fixture
def namespace(api_client: object) -> Iterator[str]:
    """A fresh namespace for one test (deleted afterwards, without waiting); its default ServiceAccount exists."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        assert time.monotonic() < deadline, f"no default ServiceAccount in {name} after 30s"
        time.sleep(0.1)
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary (fetched once into the cache beside the control-plane binaries)."""
    from dpo_dev.build import ensure_helm

    return ensure_helm()


@pytest.fixture(scope="module")
def hub_api(stack: object) -> Iterator[object]:
    """A huggingface_hub client for the local Hub of the module's `stack` fixture (a LocalStack); the test
    session is otherwise offline."""
    from huggingface_hub import HfApi, constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield HfApi(endpoint=stack.hub.url, token=stack.hub_token)
