"""LocalCluster's opt-in audit log, and the request counter on it (dpo_dev.audit, used by
benchmarks/operator_scale.py): it must name and count a client's requests exactly as the counting proxy
(dpo_dev.api_proxy) does."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from dpo_dev.api_proxy import ApiProxy, upstream_of
from dpo_dev.audit import AuditCounter
from dpo_dev.cluster import LocalCluster

from .conftest import allowed, wait_for

pytestmark = pytest.mark.timeout(300)

AUDITED = ("default", "audited")
AUDITED_USER = f"system:serviceaccount:{AUDITED[0]}:{AUDITED[1]}"


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if os.environ.get("USE_EXISTING_CLUSTER") == "1":
        pytest.skip("starts its own control plane; not applicable with USE_EXISTING_CLUSTER=1")
    cluster = LocalCluster(tmp_path_factory.mktemp("audited") / "cluster", audit_users=[AUDITED_USER]).start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _apiserver_argv(cluster: LocalCluster) -> list[str]:
    pid = cluster.pids()["kube-apiserver"]
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_default_cluster_has_no_audit_log(cluster: Any) -> None:
    if cluster.existing:
        pytest.skip("the session cluster is not a LocalCluster")
    assert cluster.local.audit_log is None
    assert not [arg for arg in _apiserver_argv(cluster.local) if arg.startswith("--audit")]
    assert not list(cluster.local.workdir.glob("audit*"))


def test_only_the_audited_users_requests_are_logged(audited: LocalCluster) -> None:
    assert audited.audit_log == audited.workdir / "audit.log"
    assert "--audit-log-mode=blocking" in _apiserver_argv(audited)
    kubeconfig = audited.sa_kubeconfig(*AUDITED)
    with config.new_client_from_config(config_file=str(kubeconfig)) as api:
        client.VersionApi(api).get_code()
        with pytest.raises(ApiException) as denied:  # no Role: denied requests are logged too
            client.CoreV1Api(api).list_namespace()
        assert denied.value.status == 403
    with audited.api_client() as admin:
        client.CoreV1Api(admin).list_namespace()

    def events() -> list[dict[str, Any]]:
        return [json.loads(line) for line in audited.audit_log.read_text().splitlines()]

    wait_for(lambda: len(events()) >= 2, what="two audit events")
    logged = events()
    assert {e["user"]["username"] for e in logged} == {AUDITED_USER}
    assert {e["level"] for e in logged} == {"Metadata"}
    assert {e["stage"] for e in logged} == {"ResponseComplete"}
    assert [(e["verb"], e["responseStatus"]["code"]) for e in logged][-2:] == [("get", 200), ("list", 403)]


def test_audit_counts_match_the_counting_proxy(audited: LocalCluster, tmp_path: Path) -> None:
    """The same requests, through the proxy to the audited API server: both name and count them alike, a watch
    once, when it opens (and not again when it ends)."""
    namespace = "audit-match"
    with audited.api_client() as admin:
        client.CoreV1Api(admin).create_namespace({"metadata": {"name": namespace}})
        client.RbacAuthorizationV1Api(admin).create_cluster_role_binding(
            {
                "metadata": {"name": "audited-admin"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "ServiceAccount", "name": AUDITED[1], "namespace": AUDITED[0]}],
            }
        )
    kubeconfig = audited.sa_kubeconfig(*AUDITED)
    counter = AuditCounter(audited.audit_log)
    ca = tmp_path / "apiserver-ca.crt"
    with ApiProxy(upstream_of(kubeconfig, ca), ca, tmp_path / "proxy") as proxy:
        proxied = proxy.kubeconfig(kubeconfig, tmp_path / "proxied.kubeconfig")
        with config.new_client_from_config(config_file=str(proxied)) as api:
            core = client.CoreV1Api(api)
            wait_for(lambda: allowed(lambda: core.list_namespaced_config_map(namespace)), what="the binding")
            proxy.reset()
            counter.reset()
            client.VersionApi(api).get_code()
            client.ApisApi(api).get_api_versions()
            client.CoreApi(api).get_api_versions()
            core.list_namespaced_config_map(namespace)
            core.create_namespaced_config_map(namespace, {"metadata": {"name": "probe"}})
            core.read_namespaced_config_map("probe", namespace)
            core.patch_namespaced_config_map("probe", namespace, {"data": {"k": "v"}})
            core.replace_namespaced_config_map("probe", namespace, {"metadata": {"name": "probe"}, "data": {}})
            core.read_namespace_status(namespace)
            for _ in watch.Watch().stream(core.list_namespaced_config_map, namespace, timeout_seconds=1):
                pass
            # A watch that stays open: counted when it opens, by both (1.20 logs a watch's ResponseStarted only at
            # its end, so the cluster's policy logs its RequestReceived).
            open_watch = core.list_namespaced_pod(namespace, watch=True, timeout_seconds=5, _preload_content=False)
            core.create_namespaced_pod(
                namespace, {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "x"}]}}
            )
            with contextlib.suppress(ApiException):  # not scheduled: the API server answers at once
                core.read_namespaced_pod_log("p", namespace, follow=True)
            core.delete_namespaced_config_map("probe", namespace)
            core.delete_collection_namespaced_config_map(namespace)
            expected = proxy.counts()
            assert expected["WATCH configmaps"] == 1 and expected["WATCH pods"] == 1, expected
            assert expected["GET pods/log"] == 1, expected
            wait_for(lambda: counter.counts() == expected, timeout=10, what=f"audit counts == {expected}")
            assert not open_watch.closed, "the watch must still be open"
            open_watch.read()  # until the API server ends it (timeoutSeconds)
            open_watch.release_conn()
        assert counter.reset() == expected

    def watch_ended() -> bool:
        events = [json.loads(line) for line in audited.audit_log.read_text().splitlines()]
        return any(e["verb"] == "watch" and e["stage"] == "ResponseComplete" and "/pods?" in e["requestURI"]
                   for e in events)  # fmt: skip

    wait_for(watch_ended, what="the open watch's ResponseComplete")
    assert counter.counts() == {}, "a watch's end must not count again"
