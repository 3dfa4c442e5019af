"""The local control plane: real schema validation, RBAC, garbage collection, helm, and clean stops."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from dpo_dev.build import Binaries, StepError, cache_dir, ensure_binaries
from dpo_dev.cluster import LocalCluster
from dpo_dev.processes import processes_in_groups

from .conftest import allowed, wait_for

pytestmark = pytest.mark.timeout(300)


def test_crd_structural_schema_served_and_invalid_object_rejected_with_field_path(api_client: Any) -> None:
    group, plural = f"t{uuid.uuid4().hex[:8]}.dpo.dev", "widgets"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["gpus"],
                                    "properties": {"gpus": {"type": "integer", "minimum": 1}},
                                },
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = client.ApiextensionsV1Api(api_client)
    extensions.create_custom_resource_definition(crd)
    try:

        def established() -> bool:
            conditions = extensions.read_custom_resource_definition(f"{plural}.{group}").status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        wait_for(established, what="CRD Established")
        custom = client.CustomObjectsApi(api_client)

        def widget(name: str, spec: dict) -> dict:
            return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}

        created = wait_for(
            lambda: _ignore_404(lambda: custom.create_namespaced_custom_object(
                group, "v1", "default", plural, widget("ok", {"gpus": 2, "unknown": "pruned"}))),
            what="the new resource to be served",
        )  # fmt: skip
        assert created["spec"] == {"gpus": 2}, "unknown fields are pruned by the structural schema"
        with pytest.raises(ApiException) as rejected:
            custom.create_namespaced_custom_object(group, "v1", "default", plural, widget("bad", {"gpus": 0}))
        assert rejected.value.status == 422
        assert "spec.gpus" in json.loads(rejected.value.body)["message"]
        custom.delete_namespaced_custom_object(group, "v1", "default", plural, "ok")
    finally:
        extensions.delete_custom_resource_definition(f"{plural}.{group}")


def _ignore_404(call: Callable[[], Any]) -> Any:
    """A freshly established CRD can 404 for a moment until its handler is installed."""
    try:
        return call()
    except ApiException as exc:
        if exc.status != 404:
            raise
        return None


def test_rbac_service_account_denied_then_allowed_by_role(
    namespace: str, api_client: Any, sa_kubeconfig: Callable[[str, str], Path]
) -> None:
    kubeconfig = sa_kubeconfig(namespace, "reader")
    with config.new_client_from_config(config_file=str(kubeconfig)) as sa_client:
        sa_core = client.CoreV1Api(sa_client)
        with pytest.raises(ApiException) as denied:
            sa_core.list_namespaced_pod(namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:reader" in denied.value.body

        rbac = client.RbacAuthorizationV1Api(api_client)
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "pod-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
            },
        )
        wait_for(lambda: allowed(lambda: sa_core.list_namespaced_pod(namespace)), what="the Role to apply")
        with pytest.raises(ApiException) as still_denied:  # the Role grants pods only, in this namespace only
            sa_core.list_namespaced_secret(namespace)
        assert still_denied.value.status == 403
        with pytest.raises(ApiException):
            sa_core.list_namespaced_pod("default")


def test_kubectl_create_token_works_too(cluster: Any, namespace: str) -> None:
    subprocess.run(["kubectl", "-n", namespace, "create", "serviceaccount", "bot"], check=True, capture_output=True)
    token = subprocess.run(
        ["kubectl", "-n", namespace, "create", "token", "bot"], check=True, capture_output=True, text=True
    ).stdout.strip()
    who = subprocess.run(
        ["kubectl", "--token", token, "auth", "can-i", "list", "pods", "-n", namespace],
        capture_output=True,
        text=True,
    )
    assert who.stdout.strip() == "no"


def test_garbage_collector_deletes_dependents(api_client: Any, namespace: str) -> None:
    core = client.CoreV1Api(api_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}})
    core.delete_namespaced_config_map("owner", namespace)
    wait_for(lambda: not core.list_namespaced_config_map(namespace, field_selector="metadata.name=child").items,
             what="the dependent ConfigMap to be collected")  # fmt: skip


def test_helm_installs_a_chart(helm: Path, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}\ndata:\n  k: {{ .Values.k | quote }}\n"
    )
    (chart / "values.yaml").write_text("k: v\n")
    subprocess.run([str(helm), "lint", "--strict", str(chart)], check=True, capture_output=True)
    subprocess.run(
        [str(helm), "install", "probe", str(chart), "-n", namespace, "--wait", "--timeout", "60s"],
        check=True,
        capture_output=True,
    )
    data = subprocess.run(
        ["kubectl", "-n", namespace, "get", "configmap", "probe", "-o", "jsonpath={.data.k}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert data == "v"


@pytest.fixture
def local_only(cluster: Any) -> None:
    if cluster.existing:
        pytest.skip("starts its own control plane; not applicable with USE_EXISTING_CLUSTER=1")


def test_binaries_are_reused_from_the_cache(local_only: None) -> None:
    started = time.monotonic()
    binaries = ensure_binaries()
    assert time.monotonic() - started < 5, "a second ensure_binaries() must not rebuild"
    for path in vars(binaries).values():
        assert path.is_file() and os.access(path, os.X_OK), path


def test_second_cluster_runs_beside_and_stops_without_leftovers(local_only: None, cluster: Any) -> None:
    second = LocalCluster().start()
    workdir, pids = second.workdir, list(second.pids().values())
    try:
        assert second.ports["apiserver"] != cluster.local.ports["apiserver"]
        with second.api_client() as api:
            names = {n.metadata.name for n in client.CoreV1Api(api).list_namespace().items}
        assert "default" in names
        probe = second.sa_kubeconfig("default", "probe")
        with config.new_client_from_config(config_file=str(probe)) as api, pytest.raises(ApiException) as denied:
            client.CoreV1Api(api).list_namespace()
        assert denied.value.status == 403
    finally:
        second.stop()
    assert not processes_in_groups(pids)
    assert not workdir.exists()


def test_failed_step_is_named_with_its_log_tail(local_only: None, tmp_path: Path) -> None:
    real = ensure_binaries()
    broken = tmp_path / "kube-apiserver"
    broken.write_text("#!/bin/sh\necho 'E0101 flag --bogus: apiserver exploded on purpose' >&2\nexit 3\n")
    broken.chmod(0o755)
    cluster = LocalCluster(
        tmp_path / "work", binaries=Binaries(real.etcd, broken, real.controller_manager, real.scheduler)
    )
    with pytest.raises(StepError) as failed:
        cluster.start()
    message = str(failed.value)
    assert "'start kube-apiserver'" in message
    assert "exited with status 3" in message
    assert "apiserver exploded on purpose" in message
    assert not processes_in_groups(cluster.pids().values()), "etcd must be stopped after the failure"


def test_cli_up_detach_status_down(local_only: None, tmp_path: Path) -> None:
    name = f"t{uuid.uuid4().hex[:6]}"
    cli = [sys.executable, "-m", "dpo_dev.cluster_cli", "--name", name]
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    up = subprocess.run([*cli, "up", "--detach", "--node", "cli-gpu-0:gpus=1", "--cwd", str(tmp_path)],
                        capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        assert up.stdout.startswith("export KUBECONFIG=")
        kubeconfig = up.stdout.strip().split("=", 1)[1]
        status = subprocess.run([*cli, "status"], capture_output=True, text=True, env=env)
        assert status.returncode == 0 and "running" in status.stdout, status.stdout
        nodes = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "nodes", "-o", "name"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "node/cli-gpu-0" in nodes
        state = json.loads((cache_dir() / "run" / name / "state.json").read_text())
        pids = [state["supervisor"]["pid"], *(p["pid"] for p in state["processes"].values())]
    finally:
        down = subprocess.run([*cli, "down"], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not processes_in_groups(pids)
    assert subprocess.run([*cli, "status"], capture_output=True, env=env).returncode == 1
    assert not (cache_dir() / "run" / name / "cluster" / "etcd").exists()
    shutil.rmtree(cache_dir() / "run" / name)
