"""The node simulator's container mode on the real control plane: pods run with podman from the project's images
(built by `dpo-localcluster images`), with the pod spec applied as a kubelet applies it. No test here falls back
to process mode: without a working podman they fail."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from dpo_dev.images import ImageInfo, ensure_images
from dpo_dev.nodesim import (
    SERVICE_ACCOUNT_DIR,
    ContainerConfigError,
    ContainerRun,
    NodeSimConfig,
    NodeSimulator,
    NodeSpec,
    local_image_refs,
    podman_run_args,
)
from dpo_dev.processes import processes_in_groups

from .conftest import wait_for

# A rebuild of the images after a code change (layer cache) takes up to a minute; a cold build three.
pytestmark = pytest.mark.timeout(1200)

TRAINER, OPERATOR = "dpo-trainer:0.1.0", "dpo-operator:0.1.0"  # as pod specs name them: no registry
POOL = {"nodesim.dpo.dev/pool": "containers"}
TAINT = {"key": "nodesim.dpo.dev/containers", "value": "true", "effect": "NoSchedule"}
TOLERATE = {"key": TAINT["key"], "operator": "Exists", "effect": "NoSchedule"}
# What the operator puts on a trainer pod (dpo_operator.manifests.build_job).
TRAINER_POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 1000,
    "fsGroup": 1000,
    "seccompProfile": {"type": "RuntimeDefault"},
}
TRAINER_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


@pytest.fixture(scope="module")
def built() -> dict[str, ImageInfo]:
    return ensure_images()


@pytest.fixture(scope="module")
def container_node(
    admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory, built: dict[str, ImageInfo]
) -> Iterator[NodeSimulator]:
    """A container-mode simulator with one node of its own; teardown fails on any container or process left."""
    simulator = NodeSimulator(
        admin_kubeconfig,
        [NodeSpec("ctr-node-0", cpu="8", memory="32Gi", labels=dict(POOL), taints=[TAINT])],
        config=NodeSimConfig(mode="container", workdir=tmp_path_factory.mktemp("nodesim-containers"), max_grace_s=5.0),
    )
    simulator.start()
    try:
        yield simulator
    finally:
        simulator.stop()
    assert not simulator.containers(), f"containers left after the simulator stopped: {simulator.containers()}"
    assert not processes_in_groups(simulator.process_groups()), "podman processes left running"


def pod(name: str, command: list[str], *, image: str = TRAINER, grace: int = 30, **container: Any) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": POOL,
            "tolerations": [TOLERATE],
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "main", "image": image, "command": command, **container}],
        },
    }


def finished(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 120) -> client.V1Pod:
    return wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace)).status.phase in ("Succeeded", "Failed") and p,
        timeout,
        f"pod {name} to finish",
    )


def running(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 60) -> client.V1Pod:
    return wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace)).status.phase == "Running" and p,
        timeout,
        f"pod {name} to run",
    )


def kubectl(namespace: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "-n", namespace, *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


def podman_names(simulator: NodeSimulator, uid: str) -> list[str]:
    """The pod's containers podman still has (by the kubelet-style label the simulator sets)."""
    result = simulator.podman("ps", "--all", f"--filter=label=io.kubernetes.pod.uid={uid}", "--format={{.Names}}")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


PROBE = """
id -u; id -G
grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
touch /probe
touch /tmp/probe && echo tmp-writable
touch /work/probe && echo work-writable
echo "greeting=$(cat /etc/settings/greeting) token=$TOKEN arg=$1 ip=$POD_IP"
printf 'probed as %s' "$(id -u)" > /dev/termination-log
exit 3
"""


def test_a_trainer_pod_runs_as_uid_1000_with_a_read_only_root_and_no_capabilities(
    container_node: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello"}})
    claim = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    core.create_namespaced_persistent_volume_claim(namespace, {"metadata": {"name": "work"}, "spec": claim})
    body = pod(
        "probe",
        ["sh", "-c", PROBE, "probe"],
        args=["$(GREETING)-$(POD_NAME)"],
        env=[
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        volumeMounts=[
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "settings", "mountPath": "/etc/settings", "readOnly": True},
            {"name": "work", "mountPath": "/work"},
        ],
        terminationMessagePath="/dev/termination-log",
        terminationMessagePolicy="FallbackToLogsOnError",
        securityContext=TRAINER_CONTAINER_SECURITY,
        resources={"limits": {"memory": "256Mi"}},
    )
    body["spec"].update(
        securityContext=TRAINER_POD_SECURITY,
        automountServiceAccountToken=False,
        volumes=[
            {"name": "tmp", "emptyDir": {}},
            {"name": "settings", "configMap": {"name": "settings"}},
            {"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
        ],
    )
    core.create_namespaced_pod(namespace, body)
    done = finished(core, namespace, "probe")
    log = kubectl(namespace, "logs", "probe")  # through the API server and the simulator's kubelet endpoint
    lines = log.splitlines()
    assert lines[0] == "1000" and "1000" in lines[1].split(), log  # uid, and fsGroup among the groups
    assert "CapEff:\t0000000000000000" in lines and "NoNewPrivs:\t1" in lines, log
    assert "Seccomp:\t2" in lines, "RuntimeDefault: podman's default seccomp filter"
    assert "touch: cannot touch '/probe': Read-only file system" in lines, log
    assert "tmp-writable" in lines and "work-writable" in lines, log
    assert f"greeting=hello token=s3cret arg=hello-probe ip={done.status.pod_ip}" in lines, log
    status = done.status.container_statuses[0]
    terminated = status.state.terminated
    assert (done.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 3, "Error")
    assert terminated.message == "probed as 1000"
    assert status.container_id.startswith("podman://") and status.image_id.startswith("localhost/dpo-trainer:0.1.0@")
    assert done.status.pod_ip.startswith("127.77.")
    wait_for(lambda: not podman_names(container_node, done.metadata.uid), 30, "the container to be removed")


def test_a_memory_limit_too_small_ends_in_oomkilled(
    container_node: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    allocate = ["python", "-c", "b = bytearray(500 * 1024 * 1024); print('allocated', len(b))"]
    core.create_namespaced_pod(namespace, pod("small", allocate, resources={"limits": {"memory": "64Mi"}}))
    core.create_namespaced_pod(namespace, pod("large", allocate, resources={"limits": {"memory": "1Gi"}}))
    core.create_namespaced_pod(namespace, pod("exit-137", ["sh", "-c", "exit 137"]))  # not every 137 is an OOM
    small = finished(core, namespace, "small").status.container_statuses[0].state.terminated
    assert (small.reason, small.exit_code) == ("OOMKilled", 137)
    assert "allocated" not in kubectl(namespace, "logs", "small")
    large = finished(core, namespace, "large").status.container_statuses[0].state.terminated
    assert (large.reason, large.exit_code) == ("Completed", 0)
    assert kubectl(namespace, "logs", "large") == f"allocated {500 * 1024 * 1024}\n"
    plain = finished(core, namespace, "exit-137").status.container_statuses[0].state.terminated
    assert (plain.reason, plain.exit_code) == ("Error", 137)


GRACEFUL = """
import signal, sys, time
def stop(*_):
    print("got SIGTERM", flush=True)
    time.sleep(2)
    print("checkpoint saved, exiting", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    time.sleep(1)
"""
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"
)


def test_deletion_sends_sigterm_waits_the_grace_period_and_removes_the_container(
    container_node: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("graceful", ["python", "-c", GRACEFUL]))  # grace 30, capped at 5
    core.create_namespaced_pod(namespace, pod("stubborn", ["python", "-c", STUBBORN], grace=3))
    uids = {name: running(core, namespace, name).metadata.uid for name in ("graceful", "stubborn")}
    for name in uids:
        wait_for(lambda n=name: kubectl(namespace, "logs", n) == "ready\n", 30, f"{name} to be ready")
    follow = subprocess.Popen(["kubectl", "-n", namespace, "logs", "-f", "graceful"], stdout=subprocess.PIPE, text=True)
    elapsed = {}
    for name in uids:
        started = time.monotonic()
        core.delete_namespaced_pod(name, namespace)
        gone = f"metadata.name={name}"
        wait_for(lambda f=gone: not core.list_namespaced_pod(namespace, field_selector=f).items, 30, f"{name} gone")
        elapsed[name] = time.monotonic() - started
        assert not podman_names(container_node, uids[name]), f"the container of {name} is left"
    streamed, _ = follow.communicate(timeout=30)
    assert streamed == "ready\ngot SIGTERM\ncheckpoint saved, exiting\n", "kubectl logs -f saw the shutdown"
    assert 2 <= elapsed["graceful"] < 5, elapsed  # its own 2 s, well inside the grace period
    assert 3 <= elapsed["stubborn"] < 10, elapsed  # SIGTERM ignored: SIGKILL once the 3 s grace period is over


def test_an_image_not_in_local_storage_is_an_image_pull_backoff(
    container_node: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, pod("missing", ["true"], image="dpo-trainer:9.9.9"))

    def waiting(reason: str) -> Any:
        statuses = core.read_namespaced_pod("missing", namespace).status.container_statuses or []
        state = statuses[0].state.waiting if statuses else None
        return state if state is not None and state.reason == reason else None

    pulled = wait_for(lambda: waiting("ErrImagePull"), 30, "ErrImagePull")
    assert "localhost/dpo-trainer:9.9.9" in pulled.message and "pulls nothing" in pulled.message
    wait_for(lambda: waiting("ImagePullBackOff"), 30, "ImagePullBackOff")


IN_CLUSTER = """
import os
from kubernetes import client, config
config.load_incluster_config()
directory = "/var/run/secrets/kubernetes.io/serviceaccount"
pod = client.CoreV1Api().read_namespaced_pod(os.environ["HOSTNAME"], open(directory + "/namespace").read())
print(os.getuid(), pod.metadata.name, pod.status.pod_ip == os.environ["POD_IP"])
"""


def test_the_annotation_runs_one_pod_in_a_container_with_its_service_account_token(
    node_simulator: NodeSimulator, api_client: Any, namespace: str, built: dict[str, ImageInfo]
) -> None:
    """On the process-mode fixture node: the operator image reads its own pod with the projected token."""
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "pod-reader"}, "rules": [rule]})
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "reader"}})
    subject = {"kind": "ServiceAccount", "name": "reader", "namespace": namespace}
    role = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"}
    rbac.create_namespaced_role_binding(
        namespace, {"metadata": {"name": "reader"}, "roleRef": role, "subjects": [subject]}
    )
    env = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    body = pod("in-cluster", ["python", "-c", IN_CLUSTER], image=OPERATOR, env=env)
    body["metadata"]["annotations"] = {"nodesim.dpo.dev/mode": "container"}
    body["spec"].update(
        serviceAccountName="reader",
        nodeSelector={"nodesim.dpo.dev/pool": "fixture"},
        tolerations=[{"key": "nodesim.dpo.dev/fixture", "operator": "Exists", "effect": "NoSchedule"}],
    )
    core.create_namespaced_pod(namespace, body)
    done = finished(core, namespace, "in-cluster")
    output = kubectl(namespace, "logs", "in-cluster")
    assert done.status.phase == "Succeeded", output
    assert output == "1000 in-cluster True\n"  # the image's user, its hostname is the pod name, its own pod IP
    assert done.status.container_statuses[0].container_id.startswith("podman://")
    wait_for(lambda: not node_simulator.containers(), 30, "the container to be removed")


def test_podman_arguments_follow_the_pod_spec(tmp_path: Path) -> None:
    """The mapping itself, without podman: a trainer-like pod spec to `podman run` flags."""
    spec = {
        "name": "trainer",
        "image": TRAINER,
        "volumeMounts": [
            {"name": "config", "mountPath": "/etc/dpo-operator", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
            {"name": "data", "mountPath": "/data", "subPath": "set-1"},
        ],
        "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "4Gi", "cpu": "64"}},
        "securityContext": TRAINER_CONTAINER_SECURITY,
    }
    pod_body = {
        "metadata": {"name": "p", "namespace": "n", "uid": "u"},
        "spec": {
            "securityContext": {**TRAINER_POD_SECURITY, "supplementalGroups": [2000]},
            "volumes": [
                {"name": "config", "configMap": {"name": "c"}},
                {"name": "tmp", "emptyDir": {}},
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": "d"}},
            ],
            "containers": [spec],
        },
    }
    run = ContainerRun(
        name="k8s_trainer_p_n_u_0",
        image="localhost/dpo-trainer:0.1.0",
        image_user="1000:1000",
        command=["dpo-trainer"],
        args=["run", "/etc/dpo-operator/dpojob.yaml"],
        env_file=tmp_path / "env",
        volumes={name: tmp_path / name for name in ("config", "tmp", "shm", "data")},
        termination=tmp_path / "termination-log",
        token_dir=tmp_path / "token",
        log=tmp_path / "0.log",
        passed_env=("CERT",),
    )
    args = podman_run_args(pod_body, spec, run)
    assert args[-3:] == ["localhost/dpo-trainer:0.1.0", "run", "/etc/dpo-operator/dpojob.yaml"]
    assert '--entrypoint=["dpo-trainer"]' in args and "--network=host" in args and "--pull=never" in args
    for flag in (
        "--user=1000:1000",
        "--group-add=1000",
        "--group-add=2000",
        "--read-only",
        "--read-only-tmpfs=false",
        "--security-opt=no-new-privileges",
        "--cap-drop=ALL",
        f"--memory={4 * 2**30}",
        f"--memory-swap={4 * 2**30}",
        "--cpu-shares=512",
        f"--mount=type=bind,source={tmp_path / 'config'},destination=/etc/dpo-operator,ro",
        f"--mount=type=bind,source={tmp_path / 'tmp'},destination=/tmp",
        f"--tmpfs=/dev/shm:rw,nosuid,nodev,mode=1777,size={2**30}",
        f"--mount=type=bind,source={tmp_path / 'data' / 'set-1'},destination=/data",
        f"--mount=type=bind,source={tmp_path / 'termination-log'},destination=/dev/termination-log",
        f"--mount=type=bind,source={tmp_path / 'token'},destination={SERVICE_ACCOUNT_DIR},ro",
        f"--env-file={tmp_path / 'env'}",
        "--env=CERT",
        "--hostname=p",
    ):
        assert flag in args, (flag, args)
    assert not any(a.startswith("--security-opt=seccomp") for a in args), "RuntimeDefault is podman's default"
    assert float(next(a for a in args if a.startswith("--cpus=")).split("=")[1]) <= 64  # at most this machine's
    assert (tmp_path / "data" / "set-1").is_dir(), "a missing subPath is created"

    as_root = {**pod_body, "spec": {**pod_body["spec"], "securityContext": {"runAsNonRoot": True}}}
    bare = {**spec, "securityContext": {}}
    with pytest.raises(ContainerConfigError, match="image will run as root"):
        podman_run_args(as_root, bare, dataclasses.replace(run, image_user=""))
    assert "--security-opt=seccomp=unconfined" in podman_run_args(
        {**pod_body, "spec": {**pod_body["spec"], "securityContext": {}}}, bare, run
    ), "no seccompProfile: unconfined, Kubernetes 1.20's default"


def test_short_image_names_are_looked_up_under_localhost_first() -> None:
    assert local_image_refs(TRAINER) == ["localhost/dpo-trainer:0.1.0", TRAINER]
    assert local_image_refs("team/trainer:1") == ["localhost/team/trainer:1", "team/trainer:1"]
    for qualified in ("localhost/dpo-trainer:0.1.0", "registry.example/x:1", "host:5000/x"):
        assert local_image_refs(qualified) == [qualified]
