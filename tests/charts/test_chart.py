"""The Helm chart: lints strictly, renders both RBAC modes without wildcards, keeps the operator's env contract,
and cannot drift from the CRD generator, operator/deploy/rbac.yaml, the Argo CD Lua or docs/install.md."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from dpo_dev import crd, values_table

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dpo-operator"
RELEASE, NAMESPACE, FULLNAME = "r", "dpo-operator-system", "r-dpo-operator"
NAMESPACED = ("--set", "watchNamespaces={a,b}")
OPENSHIFT = ("-f", str(CHART / "values-openshift.yaml"))
EVERYTHING = (
    "--set-json",
    'metrics={"serviceMonitor": {"enabled": true}, "podMonitor": {"enabled": true}, '
    '"prometheusRule": {"enabled": true}, "grafanaDashboard": {"enabled": true}}',
    "--set",
    "networkPolicy.enabled=true,podDisruptionBudget.enabled=true,argocd.healthCheck.enabled=true",
    "--set",
    "commonLabels.team=ml",
    "--set-json",
    'extraObjects=[{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-x"}}]',
)
"""Every optional object switched on."""
USER_ROLES = {f"{FULLNAME}-edit", f"{FULLNAME}-view"}
"""The user-facing aggregated ClusterRoles (rbac.aggregatedRoles), not the operator's own."""
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
    "DPO_OPERATOR_TRAINER_DEFAULTS",
    "DPO_OPERATOR_LEADER_ELECTION",
    "DPO_OPERATOR_LEASE_NAME",
    "DPO_OPERATOR_LEASE_DURATION",
    "DPO_OPERATOR_RENEW_DEADLINE",
    "DPO_OPERATOR_RETRY_PERIOD",
    "DPO_OPERATOR_DRAIN_SECONDS",
    "DPO_OPERATOR_VERBOSE",
    "DPO_OPERATOR_LOG_FORMAT",
    "DPO_OPERATOR_LOG_LEVEL",
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


def operator_cluster_roles(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's own ClusterRoles (the user-facing aggregated ones aside)."""
    return [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] not in USER_ROLES]


def normalized(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Rules as (apiGroup, resource, verb) triples, so that grouping and order do not matter."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


@pytest.mark.parametrize(
    "values", [(), NAMESPACED, OPENSHIFT, EVERYTHING], ids=["cluster-wide", "namespaced", "openshift", "everything"]
)
def test_lint_strict(helm: Path, values: tuple[str, ...]) -> None:
    result = helm_run(helm, "lint", "--strict", str(CHART), *values)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cluster_wide_rbac_equals_operator_deploy_rbac(helm: Path) -> None:
    """operator/deploy/rbac.yaml and the chart grant the same rights, so neither can drift."""
    objects = render(helm)
    cluster_roles = [o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] not in USER_ROLES]
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
    cluster_rules = normalized([r for o in operator_cluster_roles(objects) for r in o["rules"]])
    assert cluster_rules == {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
    assert not {resource for _, resource, _ in cluster_rules} & WORKLOAD_RESOURCES
    default_rules = normalized([r for o in operator_cluster_roles(render(helm)) for r in o["rules"]])
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
        (("--set", "logFormat=yaml"), "logFormat"),
        (("--set", "logLevel=TRACE"), "logLevel"),
        (("--set", "trainerDefaults.image.pullPolicy=Sometimes"), "pullPolicy"),
        (("--set", "trainerDefaults.image.digest=sha256:short"), "digest"),
        (("--set", "trainerDefaults.env[0].name=A"), "env"),
        (("--set-json", 'trainerDefaults.tolerations=[{"effect": "Never"}]'), "effect"),
        (("--set-json", 'trainerDefaults.tolerations=[{"keys": "a"}]'), "'keys'"),
        (("--set-json", 'trainerDefaults.imagePullSecrets=[{"name": ""}]'), "imagePullSecrets"),
        (("--set", "trainerDefaults.nodeSelector.gpu=1"), "nodeSelector"),
        (("--set", "trainerDefaults.priorityClassName=High"), "priorityClassName"),
        (("--set-json", 'trainerDefaults.labels={"app.kubernetes.io/managed-by": "me"}'), "managed-by"),
        (("--set-json", 'trainerDefaults.labels={"dpo-operator.io/dpojob": "x"}'), "dpo-operator.io/dpojob"),
        (("--set-json", 'trainerDefaults.annotations={"dpo-operator.io/dpojob-name": "x"}'), "dpojob-name"),
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
        "log-format",
        "log-level",
        "trainer-pull-policy",
        "trainer-digest",
        "trainer-defaults-unknown-key",
        "trainer-toleration-effect",
        "trainer-toleration-typo",
        "trainer-pull-secret",
        "trainer-node-selector-type",
        "trainer-priority-class",
        "trainer-label-selector",
        "trainer-label-own",
        "trainer-annotation-own",
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
    # No uid, gid or fsGroup pinned: the image runs as 1000, and OpenShift's restricted-v2 assigns its own.
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
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
        "DPO_OPERATOR_LOG_FORMAT": "text",
        "DPO_OPERATOR_LOG_LEVEL": "INFO",
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


TRAINER_DEFAULTS = {
    "image": {"repository": "mirror.example/dpo/trainer", "tag": "0.1.0-cu12", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "mirror-pull"}],
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "priorityClassName": "training",
    "labels": {"team": "ml"},
    "annotations": {"example.com/cost-center": "$(not-a-ref)"},
}


def test_trainer_defaults_and_logging_reach_the_operator(helm: Path) -> None:
    """Every trainerDefaults value (but cacheClaimName, its own variable) as one JSON env var the operator parses."""
    from dpo_operator.settings import OperatorSettings

    objects = render(
        helm,
        "--set-json",
        f"trainerDefaults={json.dumps({**TRAINER_DEFAULTS, 'cacheClaimName': 'hf-cache'})}",
        "--set",
        "logFormat=json",
        "--set",
        "logLevel=WARNING",
    )
    values = env(objects)
    assert values["DPO_OPERATOR_TRAINER_CACHE_CLAIM"] == "hf-cache"
    rendered = json.loads(values["DPO_OPERATOR_TRAINER_DEFAULTS"].replace("$$", "$"))
    assert rendered == {**TRAINER_DEFAULTS, "image": {**TRAINER_DEFAULTS["image"], "digest": "", "registry": ""}}
    assert (values["DPO_OPERATOR_LOG_FORMAT"], values["DPO_OPERATOR_LOG_LEVEL"]) == ("json", "WARNING")
    environ = {name: value.replace("$$", "$") for name, value in values.items() if isinstance(value, str)}
    settings = OperatorSettings.from_env({**environ, "POD_NAMESPACE": NAMESPACE})
    defaults = settings.trainer_defaults
    assert defaults.image.reference() == "mirror.example/dpo/trainer:0.1.0-cu12"
    assert defaults.annotations == {"example.com/cost-center": "$(not-a-ref)"}, "the kubelet expands no $(...)"
    assert defaults.priority_class_name == "training" and defaults.tolerations[0].key == "nvidia.com/gpu"
    assert (settings.log_format, settings.log_level) == ("json", "WARNING")
    unset = OperatorSettings.from_env(
        {"DPO_OPERATOR_TRAINER_DEFAULTS": env(render(helm))["DPO_OPERATOR_TRAINER_DEFAULTS"]}
    )
    assert unset.trainer_defaults.image.reference() is None, "the chart's defaults change no trainer pod"
    assert unset.trainer_defaults == type(unset.trainer_defaults)()


def test_values_of_a_release_before_trainer_defaults_still_render(helm: Path) -> None:
    """`helm upgrade --reuse-values` takes the old release's values, which have no trainerDefaults."""
    assert env(render(helm, "--set", "trainerDefaults=null"))["DPO_OPERATOR_TRAINER_CACHE_CLAIM"] == ""
    assert env(render(helm, "--set", "trainerDefaults=null"))["DPO_OPERATOR_TRAINER_DEFAULTS"] == "{}"
    logging_unset = env(render(helm, "--set", "logFormat=null", "--set", "logLevel=null"))
    assert (logging_unset["DPO_OPERATOR_LOG_FORMAT"], logging_unset["DPO_OPERATOR_LOG_LEVEL"]) == ("text", "INFO")
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
        {"port": "http-metrics", "path": "/metrics", "honorLabels": True, "interval": "30s", "scrapeTimeout": "10s"}
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
    """docs/gitops/argocd/dpo-operator.io/DPOJob/health.lua is the source; Helm reads only files inside the chart."""
    documented = (ROOT / "docs/gitops/argocd/dpo-operator.io/DPOJob/health.lua").read_text()
    assert (CHART / "files/argocd-health-dpojob.lua").read_text() == documented, (
        "cp docs/gitops/argocd/dpo-operator.io/DPOJob/health.lua charts/dpo-operator/files/argocd-health-dpojob.lua"
    )
    config_map = only(render(helm, "--set", "argocd.healthCheck.enabled=true"), "ConfigMap")
    assert config_map["metadata"]["name"] == f"{FULLNAME}-argocd-health"
    assert config_map["data"] == {"resource.customizations.health.dpo-operator.io_DPOJob": documented}


def test_every_value_is_described() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}{name} has no description in values.schema.json"
            walk(sub, f"{path}{name}.")

    walk(json.loads((CHART / "values.schema.json").read_text()), "")


def test_install_doc_values_table_is_current() -> None:
    """docs/install.md's table is what dpo_dev.values_table generates from values.schema.json and values.yaml."""
    documented = values_table.documented_table()
    assert documented == values_table.values_table(), "run `python -m dpo_dev.values_table --write`"
    every_value = [line.split("`")[1] for line in documented.splitlines()[2:]]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) == {path.split(".")[0] for path in every_value}, "a top-level value is missing"


def test_values_table_generator_rewrites_the_table(tmp_path: Path) -> None:
    doc = tmp_path / "install.md"
    doc.write_text(f"intro\n{values_table.START}| stale |\n{values_table.END}\noutro\n")
    assert values_table.write(doc) is True
    assert values_table.documented_table(doc) == values_table.values_table()
    assert doc.read_text().startswith("intro\n") and doc.read_text().endswith(f"{values_table.END}\noutro\n")
    assert values_table.write(doc) is False


# Escape hatches, monitoring, RBAC switches and OpenShift (issue 19).


@pytest.mark.parametrize(
    ("values", "named"),
    [
        pytest.param(("--set-json", 'commonLabels={"team": 1}'), "commonLabels", id="common-labels-type"),
        pytest.param(("--set-json", 'deploymentAnnotations={"a": true}'), "deploymentAnnotations", id="deploy-ann"),
        pytest.param(("--set-json", 'service.annotations={"a": 1}'), "annotations", id="service-annotations"),
        pytest.param(("--set", "revisionHistoryLimit=-1"), "revisionHistoryLimit", id="revision-history-limit"),
        pytest.param(
            ("--set-json", 'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone"}]'),
            "whenUnsatisfiable",
            id="spread-required",
        ),
        pytest.param(
            (
                "--set-json",
                'topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "z", "whenUnsatisfiable": "Always"}]',
            ),
            "whenUnsatisfiable",
            id="spread-enum",
        ),
        pytest.param(("--set-json", 'extraVolumes=[{"emptyDir": {}}]'), "name", id="volume-without-name"),
        pytest.param(("--set-json", 'extraVolumes=[{"name": "x"}]'), "extraVolumes", id="volume-without-source"),
        pytest.param(
            ("--set-json", 'extraVolumeMounts=[{"name": "x", "mountpath": "/x"}]'), "'mountpath'", id="mount-typo"
        ),
        pytest.param(("--set-json", 'envFrom=[{"secretref": {"name": "s"}}]'), "'secretref'", id="env-from-typo"),
        pytest.param(("--set-json", "extraObjects=[1]"), "extraObjects", id="extra-objects-type"),
        pytest.param(("--set", "rbac.create=yes"), "create", id="rbac-create-type"),
        pytest.param(("--set", "rbac.aggregatedRoles=maybe"), "aggregatedRoles", id="rbac-aggregated-type"),
        pytest.param(("--set", "metrics.podMonitor.enabled=yes"), "enabled", id="pod-monitor-type"),
        pytest.param(("--set", "metrics.podMonitor.interval=30"), "interval", id="pod-monitor-interval"),
        pytest.param(("--set", "metrics.prometheusRule.enabled=yes"), "enabled", id="rule-type"),
        pytest.param(("--set-json", 'metrics.prometheusRule.alertLabels={"a": 1}'), "alertLabels", id="alert-labels"),
        pytest.param(("--set", "metrics.prometheusRule.severity=page"), "'severity'", id="rule-unknown-key"),
        pytest.param(("--set", "metrics.grafanaDashboard.enabled=yes"), "enabled", id="dashboard-type"),
        pytest.param(("--set", "metrics.grafanaDashboard.namespace=Bad_NS"), "namespace", id="dashboard-namespace"),
    ],
)
def test_bad_escape_hatch_values_fail_naming_the_value(helm: Path, values: tuple[str, ...], named: str) -> None:
    message = render_error(helm, *values)
    assert "schema" in message and named in message, message


def test_common_labels_are_on_every_object_and_pod_labels_win_on_the_pod(helm: Path) -> None:
    objects = render(helm, *EVERYTHING, "--set", "podLabels.team=pod,podLabels.tier=ops")
    assert {o["kind"] for o in objects} >= {"Deployment", "PrometheusRule", "PodMonitor", "ServiceMonitor"}
    for obj in objects:
        if obj["metadata"]["name"] != f"{RELEASE}-x":  # extraObjects are rendered as given
            assert obj["metadata"]["labels"]["team"] == "ml", obj["kind"]
            assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "dpo-operator", obj["kind"]
    deployment = only(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["team"] == "pod" and pod_labels["tier"] == "ops"
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert only(objects, "Service")["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("source", ["commonLabels", "podLabels"])
@pytest.mark.parametrize("label", ["app.kubernetes.io/name", "app.kubernetes.io/instance", "helm.sh/chart"])
def test_extra_labels_cannot_replace_the_charts_own(helm: Path, source: str, label: str) -> None:
    message = render_error(helm, "--set-json", f"{source}={json.dumps({label: 'other'})}")
    assert f"{source} must not set {label}" in message, message


def test_escape_hatches_render_into_the_deployment_and_service(helm: Path) -> None:
    volume = {"name": "ca", "configMap": {"name": "corporate-ca"}}
    mount = {"name": "ca", "mountPath": "/etc/ssl/corporate", "readOnly": True}
    env_from = [
        {"configMapRef": {"name": "proxy-env"}},
        {"secretRef": {"name": "creds", "optional": True}, "prefix": "X_"},
    ]
    spread = [
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"},
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {"tier": "ops"}},
        },
    ]
    objects = render(
        helm,
        "--set-json",
        f"extraVolumes=[{json.dumps(volume)}]",
        "--set-json",
        f"extraVolumeMounts=[{json.dumps(mount)}]",
        "--set-json",
        f"envFrom={json.dumps(env_from)}",
        "--set-json",
        f"topologySpreadConstraints={json.dumps(spread)}",
        "--set-string",
        "deploymentAnnotations.reloader\\.stakater\\.com/auto=true",
        "--set",
        "service.annotations.example\\.com/scrape=yes",
        "--set",
        "revisionHistoryLimit=3",
    )
    deployment = only(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}, volume]
    assert main["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}, mount]
    assert main["envFrom"] == env_from
    assert [var["name"] for var in main["env"]][:3] == ["POD_NAME", "POD_NAMESPACE", "POD_IP"]
    selector = deployment["spec"]["selector"]
    assert pod["topologySpreadConstraints"] == [{**spread[0], "labelSelector": selector}, spread[1]]
    assert deployment["metadata"]["annotations"] == {"reloader.stakater.com/auto": "true"}
    assert deployment["spec"]["revisionHistoryLimit"] == 3
    assert only(objects, "Service")["metadata"]["annotations"] == {"example.com/scrape": "yes"}
    parsed = client.V1Deployment.from_dict(deployment)  # Kubernetes' own schema: types and field names
    assert client.ApiClient().sanitize_for_serialization(parsed) == deployment, "a field Kubernetes does not know"
    defaults = only(render(helm), "Deployment")
    assert defaults["spec"]["revisionHistoryLimit"] == 10 and "annotations" not in defaults["metadata"]
    assert "topologySpreadConstraints" not in defaults["spec"]["template"]["spec"]
    assert "envFrom" not in container([defaults])
    assert "annotations" not in only(render(helm), "Service")["metadata"]


def test_extra_objects_are_rendered_with_tpl(helm: Path) -> None:
    as_object = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-a"}, "data": {}}
    as_string = (
        'apiVersion: v1\nkind: Secret\nmetadata:\n  name: {{ include "dpo-operator.fullname" . }}-b\n'
        "  namespace: {{ .Release.Namespace }}\nstringData: {a: b}\n"
    )
    objects = render(helm, "--set-json", f"extraObjects={json.dumps([as_object, as_string])}")
    assert only(objects, "ConfigMap")["metadata"]["name"] == f"{RELEASE}-a"
    secret = only(objects, "Secret")
    assert secret["metadata"] == {"name": f"{FULLNAME}-b", "namespace": NAMESPACE}
    assert secret["stringData"] == {"a": "b"}


def test_older_releases_values_without_the_new_keys_still_render(helm: Path) -> None:
    """`helm upgrade --reuse-values` from a release before these values existed."""
    objects = render(
        helm,
        *("--set", "rbac=null", "--set", "commonLabels=null", "--set", "service.annotations=null"),
        *("--set", "metrics.podMonitor=null", "--set", "metrics.prometheusRule=null"),
        *("--set", "metrics.grafanaDashboard=null", "--set", "revisionHistoryLimit=null"),
    )
    assert {o["metadata"]["name"] for o in objects if o["kind"] == "ClusterRole"} >= {FULLNAME, *USER_ROLES}
    assert "revisionHistoryLimit" not in only(objects, "Deployment")["spec"]


def test_rbac_create_false_renders_no_rbac(helm: Path) -> None:
    rbac_kinds = {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    for values in [(), NAMESPACED]:
        objects = render(helm, "--set", "rbac.create=false", *values)
        assert not [o for o in objects if o["kind"] in rbac_kinds]
        assert only(objects, "Deployment") and only(objects, "ServiceAccount")
    without_user_roles = render(helm, "--set", "rbac.aggregatedRoles=false")
    assert not [o for o in without_user_roles if o["metadata"]["name"] in USER_ROLES]
    assert operator_cluster_roles(without_user_roles) == operator_cluster_roles(render(helm))


def test_user_roles_are_the_documented_ones_and_never_write_status(helm: Path) -> None:
    """docs/operator.md (Tenancy) shows the roles the chart ships, for the release dpo-operator."""
    text = (ROOT / "docs/operator.md").read_text()
    tenancy = text[text.index("## Tenancy") :]
    block = tenancy[tenancy.index("```yaml\n") + 8 : tenancy.index("```\n", tenancy.index("```yaml\n") + 8)]
    documented = {d["metadata"]["name"]: d for d in yaml.safe_load_all(block)}
    assert set(documented) == {"dpo-operator-edit", "dpo-operator-view"}
    result = helm_run(helm, "template", "dpo-operator", str(CHART), "-n", NAMESPACE)
    assert result.returncode == 0, result.stderr
    shipped = {
        o["metadata"]["name"]: o
        for o in yaml.safe_load_all(result.stdout)
        if o and o["kind"] == "ClusterRole" and o["metadata"]["name"] in documented
    }
    assert set(shipped) == set(documented)
    for name, role in shipped.items():
        aggregation = {k: v for k, v in role["metadata"]["labels"].items() if k.startswith("rbac.authorization")}
        assert aggregation == documented[name]["metadata"]["labels"], name
        assert role["rules"] == documented[name]["rules"], name
        rights = normalized(role["rules"])
        assert not {(g, r, v) for g, r, v in rights if r != "dpojobs" and v not in ("get", "list", "watch")}, name
    edit = normalized(shipped["dpo-operator-edit"]["rules"])
    assert {v for _, r, v in edit if r == "dpojobs"} == {"get", "list", "watch", "create", "update", "patch", "delete"}
    assert not {r for _, r, _ in edit} - {"dpojobs"}, "no dpojobs/status write for tenants"
    view = normalized(shipped["dpo-operator-view"]["rules"])
    assert view == {("dpo-operator.io", r, v) for r in ("dpojobs", "dpojobs/status") for v in ("get", "list", "watch")}
    labels = shipped["dpo-operator-edit"]["metadata"]["labels"]
    assert labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"


RESTRICTED_V2_FORBIDDEN_POD = ("runAsUser", "runAsGroup", "fsGroup", "supplementalGroups", "seLinuxOptions", "sysctls")


def check_restricted_v2(pod: dict[str, Any]) -> None:
    """OpenShift's restricted-v2 SCC: the SCC picks uid, gid and fsGroup (the pod must pin none), no privilege
    escalation, every capability dropped (NET_BIND_SERVICE is the only one it would allow to add), non-root,
    seccomp runtime/default or unset, no host namespaces, ports or hostPath volumes."""
    context = pod.get("securityContext", {})
    assert not set(context) & set(RESTRICTED_V2_FORBIDDEN_POD), context
    assert context.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
    assert not any(pod.get(key) for key in ("hostNetwork", "hostPID", "hostIPC"))
    assert not [v for v in pod.get("volumes", []) if "hostPath" in v]
    for box in pod["containers"] + pod.get("initContainers", []):
        own = box.get("securityContext", {})
        assert not {"runAsUser", "runAsGroup", "seLinuxOptions", "procMount"} & set(own), own
        assert own.get("allowPrivilegeEscalation") is False
        assert own.get("privileged", False) is False
        assert own.get("capabilities", {}).get("drop") == ["ALL"]
        assert set(own.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
        assert own.get("runAsNonRoot", context.get("runAsNonRoot")) is True
        assert own.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
        assert not [p for p in box.get("ports", []) if "hostPort" in p]


@pytest.mark.parametrize("values", [(), OPENSHIFT], ids=["defaults", "values-openshift"])
def test_pod_satisfies_openshift_restricted_v2(helm: Path, values: tuple[str, ...]) -> None:
    check_restricted_v2(only(render(helm, *values), "Deployment")["spec"]["template"]["spec"])


def test_restricted_v2_check_refuses_pinned_ids(helm: Path) -> None:
    pinned = only(render(helm, *OPENSHIFT, "--set", "podSecurityContext.runAsUser=1000"), "Deployment")
    with pytest.raises(AssertionError):
        check_restricted_v2(pinned["spec"]["template"]["spec"])


def exported_metric_names() -> set[str]:
    """Every series name the operator exports (dpo_operator.metrics), as Prometheus stores it."""
    from prometheus_client.metrics import MetricWrapperBase

    from dpo_operator import metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
    families = [f for m in vars(metrics).values() if isinstance(m, MetricWrapperBase) for f in m.describe()]
    families += list(metrics.StateCollector(lambda: [], lambda: 0).collect())
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


def check_promql(expression: str) -> set[str]:
    """Parse (Grafana's variables replaced as Grafana would); returns the dpo_operator_* names it reads."""
    import promql_parser

    for variable, value in (("$__rate_interval", "1m"), ("$namespace", ".*")):
        expression = expression.replace(variable, value)
    promql_parser.parse(expression)
    return set(re.findall(r"\bdpo_operator_\w+", expression))


def test_prometheus_rule_alerts_parse_and_read_real_metrics(helm: Path) -> None:
    rule = only(render(helm, "--set", "metrics.prometheusRule.enabled=true", *_RULE_LABELS), "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and rule["metadata"]["labels"]["release"] == "prom"
    [group] = rule["spec"]["groups"]
    alerts = {r["alert"]: r for r in group["rules"]}
    expected = {
        "DPOJobFailed",
        "DPOOperatorReconcileErrors",
        "DPOOperatorDown",
        "DPOOperatorNoLeader",
        "DPOOperatorRestarting",
    }
    assert set(alerts) == expected
    exported, read = exported_metric_names(), set()
    for name, alert in alerts.items():
        assert set(alert) <= {"alert", "expr", "for", "labels", "annotations"}, name
        assert alert["labels"]["team"] == "ml" and alert["labels"]["severity"] in ("warning", "critical"), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        read |= check_promql(alert["expr"])
        if "dpo_operator_" in alert["expr"] or "up{" in alert["expr"]:
            assert f'namespace="{NAMESPACE}"' in alert["expr"] and FULLNAME in alert["expr"], name
    assert read <= exported, f"not exported by dpo_operator.metrics: {read - exported}"
    assert {"dpo_operator_dpojobs", "dpo_operator_reconcile_errors_total", "dpo_operator_leader"} <= read
    assert 'phase="Failed"' in alerts["DPOJobFailed"]["expr"]
    assert alerts["DPOOperatorDown"]["expr"].startswith("absent(up{")
    severity = only(render(helm, "--set", "metrics.prometheusRule.enabled=true", "--set", _SEVERITY), "PrometheusRule")
    assert {r["labels"]["severity"] for r in severity["spec"]["groups"][0]["rules"]} == {"page"}


_RULE_LABELS = (
    "--set",
    "metrics.prometheusRule.labels.release=prom",
    "--set",
    "metrics.prometheusRule.alertLabels.team=ml",
)
_SEVERITY = "metrics.prometheusRule.alertLabels.severity=page"


def test_pod_monitor_scrapes_the_pods_honoring_their_labels(helm: Path) -> None:
    assert not [o for o in render(helm) if o["kind"] in ("PodMonitor", "PrometheusRule")], "off by default"
    objects = render(helm, "--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.labels.release=p")
    monitor = only(objects, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "p"
    assert monitor["spec"]["selector"] == only(objects, "Deployment")["spec"]["selector"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "http", "path": "/metrics", "honorLabels": True, "interval": "30s", "scrapeTimeout": "10s"}
    ]
    assert "http" in [p["name"] for p in container(objects)["ports"]]


def test_grafana_dashboard_configmap_reads_real_metrics(helm: Path) -> None:
    assert not [o for o in render(helm) if o["kind"] == "ConfigMap"], "off by default"
    objects = render(
        helm,
        *("--set", "metrics.grafanaDashboard.enabled=true", "--set", "metrics.grafanaDashboard.namespace=monitoring"),
        *("--set", "metrics.grafanaDashboard.annotations.grafana_folder=ML"),
    )
    config_map = only(objects, "ConfigMap")
    assert config_map["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "ML"}
    shipped = (CHART / "files/grafana-dashboard.json").read_text()
    assert config_map["data"] == {"dpo-operator.json": shipped}
    dashboard = json.loads(shipped)
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    exported, read = exported_metric_names(), set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            read |= check_promql(target["expr"])
    assert read <= exported, f"not exported by dpo_operator.metrics: {read - exported}"
    wanted = {"dpo_operator_dpojobs", "dpo_operator_reconcile_total", "dpo_operator_reconcile_errors_total"}
    assert wanted <= read
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_a_global_image_registry_mirrors_the_operator_and_the_default_trainer_image(helm: Path) -> None:
    """global.imageRegistry (a mirror in an air-gapped cluster) for both images; image.registry and
    trainerDefaults.image.registry override it."""
    from dpo_operator.settings import OperatorSettings

    mirrored = render(helm, "--set", "global.imageRegistry=registry.example.com:5000")
    assert container(mirrored)["image"].startswith("registry.example.com:5000/dpo-operator:")
    settings = OperatorSettings.from_env(
        {"DPO_OPERATOR_TRAINER_DEFAULTS": env(mirrored)["DPO_OPERATOR_TRAINER_DEFAULTS"]}
    )
    assert settings.trainer_defaults.image.reference() == "registry.example.com:5000/dpo-operator/trainer:0.1.0"
    own = render(
        helm,
        "--set",
        "global.imageRegistry=registry.example.com",
        "--set",
        "image.registry=operator.example.com",
        "--set",
        "trainerDefaults.image.registry=trainers.example.com",
    )
    assert container(own)["image"].startswith("operator.example.com/dpo-operator:")
    assert '"registry":"trainers.example.com"' in env(own)["DPO_OPERATOR_TRAINER_DEFAULTS"]
    assert container(render(helm))["image"].startswith("dpo-operator:"), "no registry: as before"
    assert "/global/imageRegistry" in render_error(helm, "--set", "global.imageRegistry=not a host")
