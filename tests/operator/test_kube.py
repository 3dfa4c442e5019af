"""The operator's API requests (kube.Kube: JSON over the kubernetes client's ApiClient, no typed API classes)
against the real control plane: what each answers, and how refusals and conflicts surface."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from urllib3.exceptions import ReadTimeoutError

from dpo_dev.stack import OperatorDeployment, quickstart_for_cluster
from dpo_operator import main, manifests
from dpo_operator.kube import ChildRejectedError, Kube, NotOwnedError, resource_path


@pytest.fixture(scope="module")
def kube(
    admin_kubeconfig: Path,
    api_client: client.ApiClient,
    node_simulator: object,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kube]:
    """The CRD as the chart installs it (no operator runs: replicas 0), and the admin's ApiClient."""
    chart = OperatorDeployment(admin_kubeconfig, node_simulator, tmp_path_factory.mktemp("kube"))
    chart.install({"replicas": 0})
    try:
        yield Kube(api_client)
    finally:
        chart.uninstall()


def new_dpojob(kube: Kube, namespace: str, name: str = "dpo") -> dict[str, Any]:
    document = quickstart_for_cluster(namespace, name)
    return kube.request("POST", resource_path("DPOJob", namespace), body=document)


def test_paths() -> None:
    assert resource_path("Job", "ns", "a") == "/apis/batch/v1/namespaces/ns/jobs/a"
    assert resource_path("Pod", None) == "/api/v1/pods"
    assert (
        resource_path("DPOJob", "ns", "a", "status") == "/apis/dpo-operator.io/v1alpha1/namespaces/ns/dpojobs/a/status"
    )


def test_create_adopt_and_refuse_children(kube: Kube, namespace: str) -> None:
    dpojob = new_dpojob(kube, namespace)
    uid = dpojob["metadata"]["uid"]
    config_map = manifests.build_config_map(dpojob, 1)
    created, was_created = kube.create_or_adopt(config_map, uid)
    assert was_created and created["kind"] == "ConfigMap" and created["metadata"]["uid"]
    adopted, was_created = kube.create_or_adopt(config_map, uid)
    assert not was_created and adopted["metadata"]["uid"] == created["metadata"]["uid"], "409: ours, adopted"
    with pytest.raises(NotOwnedError):
        kube.create_or_adopt(config_map, "another-uid")
    bad = {**config_map, "metadata": {**config_map["metadata"], "name": "Not_A_Name"}}
    with pytest.raises(ChildRejectedError) as refused:
        kube.create_or_adopt(bad, uid)
    assert refused.value.code == 422 and "Not_A_Name" in str(refused.value)
    assert kube.delete("ConfigMap", namespace, config_map["metadata"]["name"]) is True
    assert kube.delete("ConfigMap", namespace, config_map["metadata"]["name"]) is False, "already gone"


def test_status_patch_is_conditional_and_lists_and_events_read_json(kube: Kube, namespace: str) -> None:
    dpojob = new_dpojob(kube, namespace)
    patched = kube.patch_status(dpojob, {"phase": "Pending", "observedGeneration": 1})
    assert patched["status"]["phase"] == "Pending"
    assert patched["metadata"]["resourceVersion"] != dpojob["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as stale:
        kube.patch_status(dpojob, {"phase": "Failed"})
    assert stale.value.status == 409
    assert kube.get_dpojob(namespace, "dpo")["status"]["phase"] == "Pending"
    assert kube.get_dpojob(namespace, "missing") is None
    items, revision = kube.list_all("DPOJob", [namespace])
    assert [i["metadata"]["name"] for i in items] == ["dpo"] and items[0]["kind"] == "DPOJob" and revision
    new_dpojob(kube, namespace, "dpo-2")
    items, revision = kube.list_all("DPOJob", [namespace], page=1)
    assert sorted(i["metadata"]["name"] for i in items) == ["dpo", "dpo-2"] and revision, "read page by page"
    kube.post_event(patched, "Warning", "Testing", "an event from the operator")
    events = kube.request("GET", resource_path("Event", namespace), {"fieldSelector": "reason=Testing"})["items"]
    assert [(e["involvedObject"]["uid"], e["message"]) for e in events] == [
        (dpojob["metadata"]["uid"], "an event from the operator")
    ]
    kube.post_event(patched, "Warning", "FailedCreate", 'pods "x" is forbidden:\n  exceeded quota')
    deadline = time.monotonic() + 10  # read from the API server's watch cache, which follows etcd closely
    while not (failed := kube.failed_creates(namespace)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert failed == {dpojob["metadata"]["uid"]: 'pods "x" is forbidden: exceeded quota'}
    features = kube.server_features()
    assert features.job_suspend in (True, False)


def test_no_typed_api_class_is_imported() -> None:
    """What the operator saves by not using the typed API: their modules (and models) are never imported."""
    import subprocess

    code = (
        "import sys, dpo_operator.main, dpo_operator.reconciler; "
        "print(sorted(m for m in sys.modules if m.startswith('kubernetes.client.api.') and 'v1_api' in m))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() in ("[]", "['kubernetes.client.api.coordination_v1_api']"), loaded


def test_a_request_to_an_api_server_that_never_answers_fails_after_one_timeout(
    silent_server: tuple[str, list[socket.socket]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the operator runs: main.py loads the credentials, the reconciler's Kube copies the default client."""
    url, connections = silent_server
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kubeconfig").write_text(json.dumps(kubeconfig))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client.Configuration, "_default", None)
    assert main.load_cluster_credentials() == "kubeconfig"
    kube = Kube(client.ApiClient(), request_timeout=(1.0, 0.5))
    raised: list[Exception] = []

    def get() -> None:
        try:
            kube.get_dpojob("ns", "dpo")
        except Exception as exc:
            raised.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=get, daemon=True)
    worker.start()
    worker.join(3.0)
    assert not worker.is_alive(), "a request to a silent API server must not block for good"
    assert [type(exc) for exc in raised] == [ReadTimeoutError]
    assert time.monotonic() - started < 1.5 and len(connections) == 1, "one attempt, one timeout"


def test_patch_and_delete_act_on_the_object_with_that_uid_only(kube: Kube, namespace: str) -> None:
    dpojob = new_dpojob(kube, namespace)
    config_map, _ = kube.create_or_adopt(manifests.build_config_map(dpojob, 1), dpojob["metadata"]["uid"])
    name, uid = config_map["metadata"]["name"], config_map["metadata"]["uid"]
    annotation = {"metadata": {"annotations": {"dpo-operator.io/x": "1"}}}
    annotated = kube.patch({"kind": "ConfigMap", **config_map}, annotation)
    assert annotated["metadata"]["annotations"]["dpo-operator.io/x"] == "1"
    with pytest.raises(ApiException) as other:
        kube.patch({"kind": "ConfigMap", **config_map, "metadata": {**config_map["metadata"], "uid": "u2"}}, annotation)
    assert other.value.status in (409, 422), "a same-named object with another UID is not patched"
    assert kube.delete("ConfigMap", namespace, name, uid="another-uid") is False
    assert kube.get("ConfigMap", namespace, name) is not None, "another UID: not deleted"
    assert kube.delete("ConfigMap", namespace, name, uid=uid) is True
    assert kube.get("ConfigMap", namespace, name) is None
