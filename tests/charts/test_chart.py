"""The Helm chart: lints strictly, renders both RBAC modes without wildcards, keeps the operator's env contract,
and cannot drift from the CRD generator, operator/deploy/rbac.yaml, the Argo CD Lua or docs/install.md."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dpo_dev import crd

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dpo-operator"
RELEASE, NAMESPACE, FULLNAME = "r", "dpo-operator-system", "r-dpo-operator"
NAMESPACED = ("--set", "watchNamespaces={a,b}")
# What the operator may do only in the namespaces it manages (cluster-wide only when it manages them all).
WORKLOAD_RESOURCES = {"dpojobs", "dpojobs/status", "dpojobs/finalizers", "jobs", "configmaps", "pods", "pods/log"}
CONTRACT_ENV = [
    "POD_NAME",
    "POD_NAMESPACE",
    "POD_IP",
    "DPO_OPERATOR_LISTEN_ADDRESS",
    "DPO_OPERATOR_PORT",
    "DPO_OPERATOR_PER_DPOJOB_SERIES",
    "DPO_OPERATOR_NAMESPACES",
    "DPO_OPERATOR_RESYNC_SECONDS",
    "DPO_OPERATOR_WORKERS",
    "DPO_OPERATOR_TRAINER_ENV",
    "DPO_OPERATOR_TRAINER_CACHE_CLAIM",
    "DPO_OPERATOR_LEADER_ELECTION",
    "DPO_OPERATOR_LEASE_NAME",
    "DPO_OPERATOR_LEASE_DURATION",
    "DPO_OPERATOR_RENEW_DEADLINE",
    "DPO_OPERATOR_RETRY_PERIOD",
    "DPO_OPERATOR_DRAIN_SECONDS",
    "DPO_OPERATOR_VERBOSE",
]


def helm_run(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    """The chart's objects as `helm template` renders them with these extra arguments."""
    result = helm_run(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_error(helm: Path, *args: str) -> str:
    result = helm_run(helm, "template", RELEASE, str(CHART), "-n", NAMESPACE, *args)
    assert result.returncode != 0, f"helm template accepted {args}"
    return result.stderr


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {var["name"]: var.get("value", var.get("valueFrom")) for var in container(objects)["env"]}


def normalized(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Rules as (apiGroup, resource, verb) triples, so that grouping and order do not matter."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize("values", [(), NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_lint_strict(helm: Path, values: tuple[str, ...]) -> None:
    result = helm_run(helm, "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_wide_rbac_equals_operator_deploy_rbac(helm: Path) -> None:
    """operator/deploy/rbac.yaml and the chart grant the same rights, so neither can drift."""
    objects = render(helm)
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole"]
    deploy = next(
        o for o in yaml.safe_load_all((ROOT / "operator/deploy/rbac.yaml").read_text()) if o["kind"] == "ClusterRole"
    )
    assert normalized([r for role in cluster_roles for r in role["rules"]]) == normalized(deploy["rules"])
    assert not [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == FULLNAME]
    bindings = [o for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == {r["metadata"]["name"] for r in cluster_roles}
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_namespaced_rbac_grants_workload_rights_only_in_the_listed_namespaces(helm: Path) -> None:
    objects = render(helm, *NAMESPACED)
    cluster_rules = normalized([r for o in objects if o["kind"] == "ClusterRole" for r in o["rules"]])
    assert cluster_rules == {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
    assert not {resource for _, resource, _ in cluster_rules} & WORKLOAD_RESOURCES
    default_rules = normalized([r for o in render(helm) if o["kind"] == "ClusterRole" for r in o["rules"]])
    for namespace in ("a", "b"):
        role = next(o for o in objects if o["kind"] == "Role" and o["metadata"].get("namespace") == namespace)
        binding = next(o for o in objects if o["kind"] == "RoleBinding" and o["metadata"].get("namespace") == namespace)
        assert normalized(role["rules"]) == default_rules - cluster_rules
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": FULLNAME}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert env(objects)["DPO_OPERATOR_NAMESPACES"] == "a,b"


def test_leader_election_role_is_limited_to_the_lease(helm: Path) -> None:
    objects = render(helm)
    role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == f"{FULLNAME}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert normalized(role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}
    named = [r for r in role["rules"] if "get" in r["verbs"] or "update" in r["verbs"]]
    assert all(r["resourceNames"] == [FULLNAME] for r in named)
    assert env(objects)["DPO_OPERATOR_LEASE_NAME"] == FULLNAME
    without = render(helm, "--set", "leaderElection.enabled=false")
    assert not [o for o in without if o["metadata"]["name"].endswith("-leader-election")]


@pytest.mark.parametrize(
    "values", [(), NAMESPACED, ("--set", "leaderElection.enabled=false")], ids=["default", "namespaced", "no-le"]
)
def test_no_wildcards_in_any_rule(helm: Path, values: tuple[str, ...]) -> None:
    rules = [r for o in render(helm, *values) if o["kind"] in ("ClusterRole", "Role") for r in o["rules"]]
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), rule


@pytest.mark.parametrize(
    ("values", "named"),
    [
        (("--set", "replicas=two"), "replicas"),
        (("--set", "foo=1"), "foo"),
        (("--set", "image.pullPolicy=Sometimes"), "pullPolicy"),
        (("--set", "leaderElection.enabled=false", "--set", "replicas=2"), "replicas"),
        (("--set", "trainerEnv[0].name=HF_TOKEN", "--set", "trainerEnv[0].valueFrom.secretKeyRef.name=hf"), "key"),
        (("--set", "watchNamespaces={Bad_NS}"), "watchNamespaces"),
        (("--set", "trainerDefaults.cacheClaimName=HF_Cache"), "cacheClaimName"),
        (("--set", "metrics.perDPOJobSeries=no"), "perDPOJobSeries"),
        (("--set", "networkPolicy.monitoring.namespaceSelector.matchLabel.team=x"), "'matchLabel'"),
        (("--set-json", 'networkPolicy.extraFrom=[{"podSelectr": {}}]'), "'podSelectr'"),
    ],
    ids=[
        "replicas-type",
        "unknown-key",
        "enum",
        "replicas-without-le",
        "secret-ref-without-key",
        "namespace",
        "cache-claim",
        "per-dpojob-type",
        "selector-typo",
        "peer-typo",
    ],
)
def test_bad_values_fail_naming_the_value(helm: Path, values: tuple[str, ...], named: str) -> None:
    message = render_error(helm, *values)
    assert "schema" in message and named in message, message


def test_leader_election_timing_is_checked(helm: Path) -> None:
    message = render_error(helm, "--set", "leaderElection.renewDeadlineSeconds=20")
    assert "leaseDurationSeconds must exceed renewDeadlineSeconds" in message


def test_deployment_is_locked_down_and_has_no_command(helm: Path) -> None:
    objects = render(helm)
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(objects)
    assert "command" not in main and "args" not in main
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert main["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == only(objects, "ServiceAccount")["metadata"]["name"] == FULLNAME
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    assert main["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert main["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert (main["livenessProbe"]["initialDelaySeconds"], main["livenessProbe"]["periodSeconds"]) == (10, 10)
    assert main["livenessProbe"]["failureThreshold"] == 3
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert main["readinessProbe"]["periodSeconds"] == 5
    assert main["resources"] == {"requests": {"cpu": "100m", "memory": "160Mi"}, "limits": {"memory": "512Mi"}}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "dpo-operator",
        "app.kubernetes.io/instance": RELEASE,
    }
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/version"] == "0.1.0" and labels["helm.sh/chart"] == "dpo-operator-0.1.0"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_env_carries_the_contract(helm: Path) -> None:
    trainer_env = [
        {"name": "HF_ENDPOINT", "value": "http://hub.internal/$(not-a-ref)"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}}},
        {"name": "MIRROR", "valueFrom": {"configMapKeyRef": {"name": "m", "key": "url", "optional": True}}},
    ]
    objects = render(
        helm,
        "--set-json",
        f"trainerEnv={json.dumps(trainer_env)}",
        "--set-json",
        'extraEnv=[{"name": "EXTRA", "value": "1"}]',
        "--set",
        "verbose=true",
    )
    names = [var["name"] for var in container(objects)["env"]]
    assert names == [*CONTRACT_ENV, "EXTRA"]
    values = env(objects)
    assert values["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert values["DPO_OPERATOR_LISTEN_ADDRESS"] == "0.0.0.0", "all interfaces: kubectl port-forward works"
    # The kubelet turns "$$" back into "$": the operator reads exactly trainerEnv.
    assert json.loads(values["DPO_OPERATOR_TRAINER_ENV"].replace("$$", "$")) == trainer_env
    expected = {
        "DPO_OPERATOR_PORT": "8080",
        "DPO_OPERATOR_NAMESPACES": "",
        "DPO_OPERATOR_RESYNC_SECONDS": "30",
        "DPO_OPERATOR_WORKERS": "8",
        "DPO_OPERATOR_TRAINER_CACHE_CLAIM": "",
        "DPO_OPERATOR_LEADER_ELECTION": "true",
        "DPO_OPERATOR_LEASE_DURATION": "15",
        "DPO_OPERATOR_RENEW_DEADLINE": "10",
        "DPO_OPERATOR_RETRY_PERIOD": "2",
        "DPO_OPERATOR_PER_DPOJOB_SERIES": "true",
        "DPO_OPERATOR_DRAIN_SECONDS": "15",
        "DPO_OPERATOR_VERBOSE": "true",
    }
    assert {name: values[name] for name in expected} == expected


def test_the_operator_accepts_the_rendered_env(helm: Path) -> None:
    """What the kubelet would hand the operator parses into its settings (POD_* resolved as in a pod)."""
    from dpo_operator.settings import OperatorSettings

    objects = render(
        helm,
        "--set-json",
        'trainerEnv=[{"name": "HF_ENDPOINT", "value": "http://hub/$x"}]',
        "--set",
        "listenAddress=$(POD_IP)",
        "--set",
        "trainerDefaults.cacheClaimName=hf-cache",
        "--set",
        "metrics.perDPOJobSeries=false",
    )
    pod = {"POD_NAME": "r-dpo-operator-0", "POD_NAMESPACE": NAMESPACE, "POD_IP": "10.0.0.7"}
    environ = {
        name: value.replace("$(POD_IP)", pod["POD_IP"]).replace("$$", "$")
        for name, value in env(objects).items()
        if isinstance(value, str)
    }
    settings = OperatorSettings.from_env({**environ, **pod})
    assert settings.listen_address == "10.0.0.7" and settings.port == 8080
    assert settings.leader_election and settings.lease_name == FULLNAME and settings.lease_namespace == NAMESPACE
    assert settings.trainer_env == [{"name": "HF_ENDPOINT", "value": "http://hub/$x"}]
    assert settings.trainer_cache_claim == "hf-cache"
    assert settings.namespaces == []
    assert settings.per_dpojob_series is False and settings.drain_seconds == 15


def test_values_of_a_release_before_trainer_defaults_still_render(helm: Path) -> None:
    """`helm upgrade --reuse-values` takes the old release's values, which have no trainerDefaults."""
    assert env(render(helm, "--set", "trainerDefaults=null"))["DPO_OPERATOR_TRAINER_CACHE_CLAIM"] == ""
    older = render(helm, "--set", "metrics.perDPOJobSeries=null", "--set", "networkPolicy=null")
    assert env(older)["DPO_OPERATOR_PER_DPOJOB_SERIES"] == "true"
    assert not [o for o in older if o["kind"] == "NetworkPolicy"]


def test_strategy_follows_leader_election(helm: Path) -> None:
    with_le = only(render(helm, "--set", "replicas=2"), "Deployment")["spec"]
    assert with_le["strategy"]["type"] == "RollingUpdate" and with_le["replicas"] == 2
    objects = render(helm, "--set", "leaderElection.enabled=false")
    assert only(objects, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert env(objects)["DPO_OPERATOR_LEADER_ELECTION"] == "false"


def test_image_tag_defaults_to_app_version_and_digest_wins(helm: Path) -> None:
    assert container(render(helm))["image"] == "dpo-operator:0.1.0"
    tagged = render(helm, "--set", "image.repository=reg.example/dpo-operator", "--set", "image.tag=dev")
    assert container(tagged)["image"] == "reg.example/dpo-operator:dev"
    digest = "sha256:" + "ab" * 32
    pinned = container(render(helm, "--set", "image.tag=dev", "--set", f"image.digest={digest}"))
    assert pinned["image"] == f"dpo-operator@{digest}" and pinned["imagePullPolicy"] == "IfNotPresent"


def test_service_and_optional_objects(helm: Path) -> None:
    objects = render(helm)
    service = only(objects, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    assert {o["kind"] for o in objects} == {
        "ServiceAccount",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Service",
        "Deployment",
    }
    extras = render(
        helm,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "podDisruptionBudget.enabled=true",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "crds.enabled=false",
    )
    monitor = only(extras, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"] == [
        {"port": "http-metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert only(extras, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert not [o for o in extras if o["kind"] in ("ServiceAccount", "CustomResourceDefinition")]
    assert only(extras, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    budget = only(
        render(helm, "--set", "podDisruptionBudget.enabled=true", "--set", "podDisruptionBudget.maxUnavailable=1"),
        "PodDisruptionBudget",
    )
    assert budget["spec"]["maxUnavailable"] == 1 and "minAvailable" not in budget["spec"]


def test_network_policy_admits_only_the_monitoring_pods_to_the_operator_port(helm: Path) -> None:
    assert not [o for o in render(helm) if o["kind"] == "NetworkPolicy"], "off by default"
    node_cidr = {"ipBlock": {"cidr": "10.0.0.0/16"}}
    objects = render(
        helm,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.monitoring.namespaceSelector.matchLabels.team=observability",
        "--set",
        "networkPolicy.monitoring.podSelector.matchLabels.app=prometheus",
        "--set-json",
        f"networkPolicy.extraFrom=[{json.dumps(node_cidr)}]",
        "--set",
        "containerPort=9090",
    )
    policy = only(objects, "NetworkPolicy")
    parsed = client.V1NetworkPolicy.from_dict(policy)  # Kubernetes' own schema: types and field names
    assert client.ApiClient().sanitize_for_serialization(parsed) == policy, "a field Kubernetes does not know"
    spec = policy["spec"]
    assert spec["podSelector"] == only(objects, "Deployment")["spec"]["selector"], "exactly the operator pods"
    assert spec["policyTypes"] == ["Ingress"], "egress (to the API server) stays open"
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring", "team": "observability"}},
        "podSelector": {"matchLabels": {"app": "prometheus"}},
    }
    assert spec["ingress"] == [{"from": [monitoring, node_cidr], "ports": [{"port": 9090, "protocol": "TCP"}]}]


def test_crd_template_is_generated() -> None:
    committed = (ROOT / crd.HELM_CRD_FILE).read_text()
    assert committed == crd.render_helm(), (
        f"{crd.HELM_CRD_FILE} drifted: run `python -m dpo_dev.crd --helm > {crd.HELM_CRD_FILE}`"
    )


def test_crd_renders_cel_only_where_enforced_and_otherwise_equals_crds_dir(helm: Path) -> None:
    new = only(render(helm, "--kube-version", "1.30.0"), "CustomResourceDefinition")
    old = only(render(helm, "--kube-version", "1.20.0"), "CustomResourceDefinition")
    assert "x-kubernetes-validations" in json.dumps(new) and "x-kubernetes-validations" not in json.dumps(old)
    assert new["spec"] == crd.build_crd(cel=True)["spec"]
    assert old["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert old["metadata"]["labels"]["app.kubernetes.io/name"] == "dpo-operator"
    committed = yaml.safe_load((ROOT / crd.CRD_FILE).read_text())
    for document in (old, committed):
        document["metadata"].pop("labels")
        document["metadata"].pop("annotations", None)
    assert old == committed
    unkept = only(render(helm, "--set", "crds.keep=false"), "CustomResourceDefinition")
    assert "annotations" not in unkept["metadata"]


def test_argocd_health_lua_is_the_documented_one(helm: Path) -> None:
    documented = (ROOT / "docs/gitops/argocd-health-dpojob.lua").read_text()
    assert (CHART / "files/argocd-health-dpojob.lua").read_text() == documented, (
        "cp docs/gitops/argocd-health-dpojob.lua charts/dpo-operator/files/"
    )
    config_map = only(render(helm, "--set", "argocd.healthCheck.enabled=true"), "ConfigMap")
    assert config_map["metadata"]["name"] == f"{FULLNAME}-argocd-health"
    assert config_map["data"] == {"resource.customizations.health.dpo-operator.io_DPOJob": documented}


def schema_rows(node: dict[str, Any], defaults: Any, prefix: str = "") -> list[str]:
    """One Markdown row per leaf value (objects with declared properties are walked, not listed)."""
    rows = []
    for name, sub in node["properties"].items():
        path = f"{prefix}{name}"
        default = defaults.get(name, ...) if isinstance(defaults, dict) else ...
        if "properties" in sub:
            rows += schema_rows(sub, default, f"{path}.")
            continue
        kind = " or ".join(sub["type"]) if isinstance(sub["type"], list) else sub["type"]
        shown = "—" if default is ... else f"`{json.dumps(default)}`"
        description = sub["description"].replace("|", r"\|")
        rows.append(f"| `{path}` | {kind} | {shown} | {description} |")
    return rows


def values_table() -> str:
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    header = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    return "\n".join(header + schema_rows(schema, defaults)) + "\n"


def test_every_value_is_described() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}{name} has no description in values.schema.json"
            walk(sub, f"{path}{name}.")

    walk(json.loads((CHART / "values.schema.json").read_text()), "")


def test_install_doc_values_table_is_current() -> None:
    text = (ROOT / "docs/install.md").read_text()
    start, end = "<!-- values-table:start -->\n", "<!-- values-table:end -->"
    assert start in text and end in text
    documented = text.split(start, 1)[1].split(end, 1)[0]
    expected = values_table()
    assert documented == expected, f"docs/install.md: replace the values table with\n{expected}"
