"""The node simulator on the real control plane: scheduling onto fake GPU nodes, pods run as local processes
or scripted, their logs through the apiserver, deletion that leaves no process behind, and what a kubelet gives a
process-mode pod: its own IP, a service-account token at the in-cluster path, probes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from dpo_dev.nodesim import SERVICE_ACCOUNT_DIR, NodeSimulator, Outcome
from dpo_dev.processes import processes_in_groups

from .conftest import wait_for

pytestmark = pytest.mark.timeout(180)

POOL = {"nodesim.dpo.dev/pool": "fixture"}
TOLERATE_FIXTURE = {"key": "nodesim.dpo.dev/fixture", "operator": "Exists", "effect": "NoSchedule"}
TOLERATE_GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
SIMULATE = {"nodesim.dpo.dev/mode": "simulate"}


def template(
    command: list[str] | None = None,
    *,
    gpus: int = 0,
    annotations: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    restart_policy: str = "Never",
    image: str = "python:3.11",
    **container: Any,
) -> dict:
    """A pod template for the fixture nodes (their pool label and taint)."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    main = {"name": "main", "image": image, "resources": resources, **container}
    if command is not None:
        main["command"] = command
    return {
        "metadata": {"annotations": annotations or {}},
        "spec": {
            "restartPolicy": restart_policy,
            "nodeSelector": POOL,
            "tolerations": [TOLERATE_FIXTURE] if tolerations is None else tolerations,
            "terminationGracePeriodSeconds": 30,
            "containers": [main],
        },
    }


def create_pod(core: client.CoreV1Api, namespace: str, name: str, tmpl: dict) -> None:
    tmpl = json.loads(json.dumps(tmpl))
    tmpl["metadata"]["name"] = name
    core.create_namespaced_pod(namespace, tmpl)


def create_job(api: Any, namespace: str, name: str, tmpl: dict) -> None:
    body = {"metadata": {"name": name}, "spec": {"backoffLimit": 0, "template": tmpl}}
    client.BatchV1Api(api).create_namespaced_job(namespace, body)


def pod_of_job(core: client.CoreV1Api, namespace: str, job: str) -> client.V1Pod:
    return wait_for(
        lambda: next(iter(core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items), None),
        what=f"a pod of job {job}",
    )


def pod_phase(core: client.CoreV1Api, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 30):
    return wait_for(
        lambda: (p := core.read_namespaced_pod(name, namespace)).status.phase in phases and p,
        timeout,
        f"pod {name} in {phases}",
    )


def job_condition(api: Any, namespace: str, name: str, kind: str, timeout: float = 30) -> None:
    batch = client.BatchV1Api(api)

    def has() -> bool:
        conditions = batch.read_namespaced_job_status(name, namespace).status.conditions or []
        return any(c.type == kind and c.status == "True" for c in conditions)

    wait_for(has, timeout, f"job {name} {kind}")


def unschedulable(core: client.CoreV1Api, namespace: str, name: str) -> str:
    """The scheduler's message once it has given up placing the pod."""

    def message() -> str | None:
        pod = core.read_namespaced_pod(name, namespace)
        for condition in pod.status.conditions or []:
            if condition.type == "PodScheduled" and condition.reason == "Unschedulable":
                assert not pod.spec.node_name
                return condition.message
        return None

    return wait_for(message, what=f"pod {name} Unschedulable")


def kubectl(namespace: str, *args: str) -> str:
    return subprocess.run(
        ["kubectl", "-n", namespace, *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout


# --- nodes and scheduling ------------------------------------------------------------------------------


def test_fake_nodes_are_ready_with_gpus_and_kubelet_endpoint(node_simulator: NodeSimulator, api_client: Any) -> None:
    core = client.CoreV1Api(api_client)
    node = core.read_node("sim-gpu-0")
    assert node.status.capacity["nvidia.com/gpu"] == "2"
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert node.status.daemon_endpoints.kubelet_endpoint.port == node_simulator.kubelet_port
    assert [a.address for a in node.status.addresses if a.type == "InternalIP"] == [node_simulator.config.address]
    assert not any(t.key == "node.kubernetes.io/not-ready" for t in node.spec.taints or [])
    lease = client.CoordinationV1Api(api_client).read_namespaced_lease("sim-gpu-0", "kube-node-lease")
    assert lease.spec.holder_identity == "sim-gpu-0"
    assert dt.datetime.now(dt.UTC) - lease.spec.renew_time < dt.timedelta(seconds=60)


def test_job_pod_is_bound_to_the_gpu_node_that_fits_and_completes(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    create_job(api_client, namespace, "two-gpus", template(gpus=2, annotations=SIMULATE))
    pod = pod_of_job(core, namespace, "two-gpus")
    bound = wait_for(lambda: core.read_namespaced_pod(pod.metadata.name, namespace).spec.node_name, what="binding")
    assert bound == "sim-gpu-0"  # sim-gpu-1 also fits but is tainted; sim-cpu-0 has no GPU
    job_condition(api_client, namespace, "two-gpus", "Complete")


def test_pod_asking_more_gpus_than_any_node_has_stays_pending(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    create_pod(core, namespace, "eight-gpus", template(gpus=8, tolerations=[TOLERATE_FIXTURE, TOLERATE_GPU]))
    assert "Insufficient nvidia.com/gpu" in unschedulable(core, namespace, "eight-gpus")
    time.sleep(2)
    pod = core.read_namespaced_pod("eight-gpus", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_taints_and_tolerations_are_honoured(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    create_pod(core, namespace, "untolerated", template(gpus=4, annotations=SIMULATE))
    create_pod(core, namespace, "tolerated", template(gpus=4, annotations=SIMULATE,
                                                      tolerations=[TOLERATE_FIXTURE, TOLERATE_GPU]))  # fmt: skip
    create_pod(core, namespace, "no-tolerations", template(annotations=SIMULATE, tolerations=[]))
    assert "taint" in unschedulable(core, namespace, "untolerated")
    assert "taint" in unschedulable(core, namespace, "no-tolerations")
    assert pod_phase(core, namespace, "tolerated", ("Succeeded",)).spec.node_name == "sim-gpu-1"


# --- process mode ----------------------------------------------------------------------------------------


def test_process_mode_hello_job(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    script = "print('hi'); open('/dev/termination-log', 'w').write('said hi')"
    create_job(api_client, namespace, "hello", template(["python", "-c", script]))
    name = pod_of_job(core, namespace, "hello").metadata.name
    pod = pod_phase(core, namespace, name, ("Succeeded", "Failed"))
    assert pod.status.phase == "Succeeded"
    assert pod.status.host_ip == node_simulator.config.address and pod.status.start_time is not None
    assert pod.status.pod_ip.startswith("127.77.") and pod.status.pod_ips[0].ip == pod.status.pod_ip
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (0, "Completed", "said hi")
    assert kubectl(namespace, "logs", name) == "hi\n"
    job_condition(api_client, namespace, "hello", "Complete")


def test_process_mode_env_volumes_and_rewritten_paths(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "settings"}, "data": {"greeting": "hello", "config.yaml": "lr: 0.1\n"}}
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "work"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
    )
    script = (
        "import json, os; "
        "open('/work/out.txt', 'w').write(open('/etc/settings/config.yaml').read()); "
        "open(os.environ['SCRATCH'] + '/x', 'w').write('x'); "
        "print(json.dumps({k: os.environ.get(k) for k in ['PLAIN', 'TOKEN', 'GREETING', 'POD', 'NODE', 'DERIVED', "
        "'CM_greeting', 'OUT']})); "
        "open('/status/message', 'w').write('done at ' + os.environ['OUT'])"
    )
    tmpl = template(
        ["python", "-c", script],
        env=[
            {"name": "PLAIN", "value": "p"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "DERIVED", "value": "$(PLAIN)-$(GREETING)"},
            {"name": "OUT", "value": "/work/out.txt"},
            {"name": "SCRATCH", "value": "/scratch"},
        ],
        envFrom=[{"prefix": "CM_", "configMapRef": {"name": "settings"}}],
        volumeMounts=[
            {"name": "settings", "mountPath": "/etc/settings"},
            {"name": "work", "mountPath": "/work"},
            {"name": "scratch", "mountPath": "/scratch"},
        ],
        terminationMessagePath="/status/message",
    )
    tmpl["spec"]["volumes"] = [
        {"name": "settings", "configMap": {"name": "settings"}},
        {"name": "work", "persistentVolumeClaim": {"claimName": "work"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    create_pod(core, namespace, "env", tmpl)
    pod = pod_phase(core, namespace, "env", ("Succeeded", "Failed"))
    output = kubectl(namespace, "logs", "env")
    assert pod.status.phase == "Succeeded", output
    seen = json.loads(output)
    volume = core.read_persistent_volume(
        core.read_namespaced_persistent_volume_claim("work", namespace).spec.volume_name
    )
    work = Path(volume.spec.host_path.path)
    assert seen == {
        "PLAIN": "p",
        "TOKEN": "s3cret",
        "GREETING": "hello",
        "POD": "env",
        "NODE": pod.spec.node_name,
        "DERIVED": "p-hello",
        "CM_greeting": "hello",
        "OUT": str(work / "out.txt"),
    }
    assert (work / "out.txt").read_text() == "lr: 0.1\n"
    assert pod.status.container_statuses[0].state.terminated.message == f"done at {work / 'out.txt'}"


def test_logs_stream_while_running_and_end_with_the_process(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    script = "import time\nfor i in range(5):\n    print(f'step {i}', flush=True)\n    time.sleep(0.4)"
    create_pod(core, namespace, "talker", template(["python", "-c", script]))
    pod_phase(core, namespace, "talker", ("Running", "Succeeded"))
    arrivals = []
    for line in watch.Watch().stream(core.read_namespaced_pod_log, name="talker", namespace=namespace):
        arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals] == [f"step {i}" for i in range(5)]
    assert arrivals[-1][0] - arrivals[0][0] > 0.8, "lines must arrive while the process runs"
    pod_phase(core, namespace, "talker", ("Succeeded",))
    assert kubectl(namespace, "logs", "talker", "--tail=2") == "step 3\nstep 4\n"
    assert kubectl(namespace, "logs", "-f", "talker").count("step") == 5
    stamped = kubectl(namespace, "logs", "talker", "--timestamps").splitlines()
    assert len(stamped) == 5 and all(dt.datetime.fromisoformat(s.split()[0][:26]) for s in stamped)
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert kubectl(namespace, "logs", "talker", f"--since-time={future}") == ""
    assert kubectl(namespace, "logs", "talker", "--since=1h").count("step") == 5


def test_stdout_lines_do_not_mix_with_stderr_progress_bars(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    script = (
        "import sys, time\n"
        "sys.stderr.write('\\r 10%'); sys.stderr.flush(); time.sleep(0.2)\n"
        "print('{\"step\": 1}', flush=True); time.sleep(0.2)\n"
        "sys.stderr.write('\\r100%\\n')"
    )
    create_pod(core, namespace, "progress", template(["python", "-c", script]))
    pod_phase(core, namespace, "progress", ("Succeeded",))
    raw = subprocess.run(["kubectl", "-n", namespace, "logs", "progress"], check=True, capture_output=True).stdout
    lines = raw.split(b"\n")  # bytes: text mode and splitlines() would both break lines at \r
    assert b'{"step": 1}' in lines
    assert b"\r 10%\r100%" in lines


def test_fallback_to_logs_on_error(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    script = "print('loading'); print('boom: out of patience'); raise SystemExit(3)"
    create_pod(
        core, namespace, "crash", template(["python", "-c", script], terminationMessagePolicy="FallbackToLogsOnError")
    )
    pod = pod_phase(core, namespace, "crash", ("Failed",))
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (3, "Error")
    assert terminated.message.endswith("boom: out of patience\n")


def test_missing_secret_blocks_the_container_until_it_exists(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    create_pod(core, namespace, "waits", template(["python", "-c", "import os; print(os.environ['TOKEN'])"], env=env))

    def waiting_reason() -> str | None:
        statuses = core.read_namespaced_pod("waits", namespace).status.container_statuses or []
        return statuses and statuses[0].state.waiting and statuses[0].state.waiting.reason

    assert wait_for(lambda: waiting_reason() == "CreateContainerConfigError", what="CreateContainerConfigError")
    core.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"token": "t0k"}})
    pod_phase(core, namespace, "waits", ("Succeeded",))
    assert kubectl(namespace, "logs", "waits") == "t0k\n"


def test_deleting_a_running_pod_kills_its_process(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    before = set(node_simulator.process_groups())
    create_pod(core, namespace, "sleeper", template(["python", "-c", "import time; time.sleep(600)"]))
    pod_phase(core, namespace, "sleeper", ("Running",))
    groups = wait_for(lambda: set(node_simulator.process_groups()) - before, what="the pod's process")
    assert processes_in_groups(groups)
    core.delete_namespaced_pod("sleeper", namespace)  # default grace period: the simulator must finish it
    wait_for(lambda: not core.list_namespaced_pod(namespace, field_selector="metadata.name=sleeper").items,
             timeout=20, what="the pod to be gone")  # fmt: skip
    assert not processes_in_groups(groups)


def test_deleting_a_job_removes_its_running_pod(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    create_job(api_client, namespace, "long", template(["python", "-c", "import time; time.sleep(600)"]))
    name = pod_of_job(core, namespace, "long").metadata.name
    pod_phase(core, namespace, name, ("Running",))
    client.BatchV1Api(api_client).delete_namespaced_job("long", namespace, propagation_policy="Foreground")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=30, what="the job's pod to be gone")


# --- what a kubelet gives a process-mode pod: IP, service-account token, probes ---------------------------

POD_IP_ENV = [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
IN_CLUSTER = """
import base64, json, os
from kubernetes import client, config
assert "KUBECONFIG" not in os.environ, "the pod must not see the test's kubeconfig"
config.load_incluster_config()
directory = "/var/run/secrets/kubernetes.io/serviceaccount"
pod = client.CoreV1Api().read_namespaced_pod(os.environ["POD_NAME"], open(directory + "/namespace").read())
claims = json.loads(base64.urlsafe_b64decode(open(directory + "/token").read().split(".")[1] + "=="))
mode = oct(os.stat(directory + "/token").st_mode & 0o777)
print(pod.metadata.name, pod.spec.service_account_name, claims["kubernetes.io"]["pod"]["name"], mode)
"""


def token_mounts() -> list[str]:
    """Mounts of the simulator's kind in this (the host's) mount namespace."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line for line in lines if "nodesim-secrets" in line or "kubernetes.io/serviceaccount" in line]


@pytest.fixture
def host_untouched() -> Iterator[None]:
    """The token mounts live in the pods' own mount namespaces: the host keeps its paths and mount table."""
    before = (Path(SERVICE_ACCOUNT_DIR).exists(), token_mounts())
    yield
    assert (Path(SERVICE_ACCOUNT_DIR).exists(), token_mounts()) == before


def in_cluster_pod(account: str, **spec: Any) -> dict:
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]
    tmpl = template([sys.executable, "-c", IN_CLUSTER], env=env)
    tmpl["spec"].update(serviceAccountName=account, **spec)
    return tmpl


def http_server(readiness_port: int | str, **container: Any) -> dict:
    """A pod serving HTTP on $(POD_IP):8080 with a readiness probe on ``readiness_port``, probed every second."""
    command = [sys.executable, "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
    probe = {"httpGet": {"port": readiness_port, "path": "/"}, "periodSeconds": 1}
    return template(command, env=POD_IP_ENV, readinessProbe=probe, **container)


def test_in_cluster_config_reads_its_own_pod(
    node_simulator: NodeSimulator, api_client: Any, namespace: str, host_untouched: None
) -> None:
    core, rbac = client.CoreV1Api(api_client), client.RbacAuthorizationV1Api(api_client)
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "pod-reader"}, "rules": [rule]})
    for account, automount in (("reader", None), ("quiet", False)):
        core.create_namespaced_service_account(
            namespace, {"metadata": {"name": account}, "automountServiceAccountToken": automount}
        )
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        role = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"}
        rbac.create_namespaced_role_binding(
            namespace, {"metadata": {"name": account}, "roleRef": role, "subjects": [subject]}
        )
    create_pod(core, namespace, "reader", in_cluster_pod("reader"))
    create_pod(core, namespace, "opted-out", in_cluster_pod("reader", automountServiceAccountToken=False))
    create_pod(core, namespace, "quiet-account", in_cluster_pod("quiet"))  # the ServiceAccount opts out
    pod = pod_phase(core, namespace, "reader", ("Succeeded", "Failed"))
    output = kubectl(namespace, "logs", "reader")
    assert pod.status.phase == "Succeeded", output
    assert output == "reader reader reader 0o600\n"  # read through the API; the token is bound to this pod
    for name in ("opted-out", "quiet-account"):
        assert pod_phase(core, namespace, name, ("Succeeded", "Failed")).status.phase == "Failed"
        assert "Service token file does not exist" in kubectl(namespace, "logs", name)


def test_failing_token_mount_is_a_start_error(
    node_simulator: NodeSimulator, api_client: Any, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "mount"  # as where mount namespaces are not permitted
    fake.write_text("#!/bin/sh\necho 'mount: /var/run: permission denied.' >&2\nexit 32\n")
    fake.chmod(0o755)
    path = os.pathsep.join([str(tmp_path), str(Path(sys.executable).parent), os.environ["PATH"]])
    config = node_simulator.config
    monkeypatch.setattr(node_simulator, "config", dataclasses.replace(config, env={**config.env, "PATH": path}))
    core = client.CoreV1Api(api_client)
    create_pod(core, namespace, "no-mount", template([sys.executable, "-c", "print('must not run')"]))
    pod = pod_phase(core, namespace, "no-mount", ("Succeeded", "Failed"))
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.reason, terminated.exit_code) == ("StartError", 128)
    assert terminated.message.startswith(f"cannot mount the service-account token at {SERVICE_ACCOUNT_DIR}")
    assert "permission denied" in terminated.message
    assert "must not run" not in kubectl(namespace, "logs", "no-mount")


def test_pods_get_their_own_ip_and_readiness_follows_the_probe(
    node_simulator: NodeSimulator, api_client: Any, namespace: str, host_untouched: None
) -> None:
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    startup = {"tcpSocket": {"port": 8080}, "periodSeconds": 1, "failureThreshold": 30}
    ports = [{"name": "http", "containerPort": 8080}]
    tmpl = http_server("http", ports=ports, startupProbe=startup, restart_policy="Always")
    tmpl["metadata"]["labels"] = {"app": "web"}
    tmpl["spec"]["nodeSelector"] = {**POOL, "kubernetes.io/hostname": "sim-cpu-0"}  # both replicas on one node
    selector = {"matchLabels": {"app": "web"}}
    body = {"metadata": {"name": "web"}, "spec": {"replicas": 2, "selector": selector, "template": tmpl}}
    apps.create_namespaced_deployment(namespace, body)
    create_pod(core, namespace, "deaf", http_server(8081))  # nothing listens there
    wait_for(lambda: apps.read_namespaced_deployment_status("web", namespace).status.ready_replicas == 2,
             what="2 ready replicas")  # fmt: skip
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2 and {p.spec.node_name for p in pods} == {"sim-cpu-0"}
    ips = [p.status.pod_ip for p in pods]
    assert len(set(ips)) == 2 and all(ip.startswith("127.77.") for ip in ips)  # both bound $(POD_IP):8080
    for pod in pods:
        assert pod.status.host_ip == node_simulator.config.address
        conditions = {c.type: c.status for c in pod.status.conditions}
        assert conditions["Ready"] == conditions["ContainersReady"] == "True"
        assert pod.status.container_statuses[0].started and pod.status.container_statuses[0].ready
        with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/", timeout=5) as response:
            assert response.status == 200
    time.sleep(3)  # three failed readiness probes
    deaf = core.read_namespaced_pod("deaf", namespace)
    assert deaf.status.phase == "Running"
    status = deaf.status.container_statuses[0]
    assert status.state.running and status.started and not status.ready
    ready_condition = next(c for c in deaf.status.conditions if c.type == "Ready")
    assert (ready_condition.status, ready_condition.reason) == ("False", "ContainersNotReady")


def test_failing_liveness_probe_restarts_the_container(
    node_simulator: NodeSimulator, api_client: Any, namespace: str
) -> None:
    core = client.CoreV1Api(api_client)
    liveness = {"httpGet": {"port": 8081, "path": "/healthz"}, "periodSeconds": 1, "failureThreshold": 2}
    command = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
    create_pod(core, namespace, "wedged", template(command, restart_policy="Always", livenessProbe=liveness))

    def restarted() -> client.V1ContainerStatus | None:
        statuses = core.read_namespaced_pod("wedged", namespace).status.container_statuses or []
        return statuses[0] if statuses and statuses[0].restart_count >= 1 else None

    status = wait_for(restarted, what="a restart after the liveness probe failed")
    assert (status.last_state.terminated.exit_code, status.last_state.terminated.reason) == (143, "Error")
    assert core.read_namespaced_pod("wedged", namespace).status.phase == "Running"
    assert kubectl(namespace, "logs", "wedged", "--previous") == "up\n"


# --- simulate mode -----------------------------------------------------------------------------------------


def test_scripted_oom_kill_by_annotation(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    annotations = {
        "nodesim.dpo.dev/exit-code": "137",
        "nodesim.dpo.dev/reason": "OOMKilled",
        "nodesim.dpo.dev/duration": "0.3",
        "nodesim.dpo.dev/logs": "loading shards\nallocating",
    }
    create_job(api_client, namespace, "oom", template(gpus=1, annotations=annotations))
    name = pod_of_job(core, namespace, "oom").metadata.name
    pod = pod_phase(core, namespace, name, ("Failed",))
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason) == (137, "OOMKilled")
    assert kubectl(namespace, "logs", name) == "loading shards\nallocating\n"
    job_condition(api_client, namespace, "oom", "Failed")


def test_scripted_rule_restarts_then_succeeds(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)

    def flaky(pod: dict, container: str, restarts: int) -> Outcome | None:
        if pod["metadata"]["namespace"] != namespace:
            return None
        if restarts == 0:
            return Outcome(exit_code=2, duration_s=0.1, message="transient failure")
        return Outcome(exit_code=0, duration_s=0.1, message="recovered")

    with node_simulator.scripted(flaky):
        create_pod(core, namespace, "flaky", template(["does-not-run"], restart_policy="OnFailure"))
        pod = pod_phase(core, namespace, "flaky", ("Succeeded",))
    status = pod.status.container_statuses[0]
    assert status.restart_count == 1
    assert (status.last_state.terminated.exit_code, status.last_state.terminated.message) == (2, "transient failure")
    assert status.state.terminated.message == "recovered"


def test_image_pull_failure_is_reported(node_simulator: NodeSimulator, api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    create_pod(core, namespace, "bad-image", template(image="registry.example/does-not-exist:1"))
    reasons: set[str] = set()

    def seen_backoff() -> bool:
        statuses = core.read_namespaced_pod("bad-image", namespace).status.container_statuses or []
        if statuses and statuses[0].state.waiting:
            reasons.add(statuses[0].state.waiting.reason)
        return "ImagePullBackOff" in reasons

    wait_for(seen_backoff, what="ImagePullBackOff")
    assert "ErrImagePull" in reasons
    assert core.read_namespaced_pod("bad-image", namespace).status.phase == "Pending"


# --- pure helpers --------------------------------------------------------------------------------------------


def test_env_expansion_follows_kubernetes_rules() -> None:
    from dpo_dev.nodesim.pods import _expand

    env = {"A": "1", "B": "two"}
    assert _expand("$(A)-$(B)", env) == "1-two"
    assert _expand("$$(A) $(MISSING)", env) == "$(A) $(MISSING)"


def test_path_rewriting_respects_path_boundaries(tmp_path: Path) -> None:
    from dpo_dev.nodesim.process import _path_rewriter

    spec = {"volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "cfg", "mountPath": "/data/cfg/"}]}
    rewrite = _path_rewriter(spec, {"data": tmp_path / "d", "cfg": tmp_path / "c"}, tmp_path / "msg")
    assert rewrite("--out=/data/x --cfg /data/cfg/a.yaml") == f"--out={tmp_path}/d/x --cfg {tmp_path}/c/a.yaml"
    assert rewrite("/database /data") == f"/database {tmp_path}/d"
    assert rewrite("/dev/termination-log") == str(tmp_path / "msg")


def test_node_option_parsing() -> None:
    from dpo_dev.nodesim import parse_node

    node = parse_node("gpu-0:gpus=2,cpu=4,memory=8Gi,label.pool=a,taint.nvidia.com/gpu=present:NoExecute,taint.x=y")
    assert (node.name, node.gpus, node.cpu, node.memory, node.labels) == ("gpu-0", 2, "4", "8Gi", {"pool": "a"})
    assert node.taints == [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoExecute"},
        {"key": "x", "value": "y", "effect": "NoSchedule"},
    ]
    assert node.capacity()["nvidia.com/gpu"] == "2"
    with pytest.raises(ValueError, match="unknown node option"):
        parse_node("n:bogus=1")
