"""dist/install.yaml (`python -m dpo_dev.dist`): the chart rendered once, cluster-wide, for `kubectl apply`."""

from __future__ import annotations

from pathlib import Path

import yaml

from dpo_dev import dist


def test_install_manifest_is_the_cluster_wide_chart_with_its_namespace_first(helm: Path, tmp_path: Path) -> None:
    output = tmp_path / "install.yaml"
    image = "image.repository=ghcr.io/o/operator"
    assert dist.main(["--helm", str(helm), "--output", str(output), "--set", image]) == 0
    objects = [o for o in yaml.safe_load_all(output.read_text()) if o]
    kinds = [o["kind"] for o in objects]
    assert objects[0] == dist.namespace_object("dpo-operator")
    assert kinds[1] == "CustomResourceDefinition"
    assert objects[1]["metadata"]["name"] == "dpojobs.dpo-operator.io"
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        assert namespace == "dpo-operator" or (obj["kind"] in dist.CLUSTER_SCOPED and namespace is None), obj
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    assert deployment["metadata"]["name"] == "dpo-operator"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith("ghcr.io/o/operator:")
    # Cluster-wide: the operator's rights are bound cluster-wide, to its ServiceAccount in the namespace.
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not env.get("DPO_OPERATOR_NAMESPACES")
    subjects = [s for o in objects if o["kind"] == "ClusterRoleBinding" for s in o.get("subjects", [])]
    assert {"kind": "ServiceAccount", "name": "dpo-operator", "namespace": "dpo-operator"} in subjects
    assert output.read_text().startswith("# dpo-operator ")


def test_every_namespaced_object_gets_the_namespace() -> None:
    objects = dist.install_objects(
        [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}, {"kind": "ClusterRole", "metadata": {}}],
        "ns",
    )
    assert [o["kind"] for o in objects] == ["Namespace", "ConfigMap", "ClusterRole"]
    assert objects[1]["metadata"]["namespace"] == "ns" and "namespace" not in objects[2]["metadata"]
