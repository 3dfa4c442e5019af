"""Modern-cluster conformance without a modern server: the embedded control plane is Kubernetes 1.20, so the
paths only newer clusters take (Job suspend and podFailurePolicy, policy/v1 PDBs, the CRD's CEL rules) are checked
here against the real OpenAPI schemas of Kubernetes 1.28 … 1.34 (shipped offline by kubernetes-validate, in
their strict form: an unknown field is an error) and the CEL rules are compiled and evaluated with cel-python.

- every object the chart renders (defaults, namespaced, every `enabled` switch on, each example values file in
  the chart), rendered for each version (`helm template --kube-version`);
- every manifest the operator builds (the Job with the newer-server features on, its ConfigMap, an Event);
- every CEL rule of the CRD (`dpo_dev.crd.build_crd(cel=True)`): one spec it accepts and one it rejects, each
  agreeing with the pydantic model.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml
from celpy import celtypes
from packaging.version import Version
from referencing import Registry, Resource

from dpo_dev import crd, monitoring_schemas
from dpo_operator import manifests
from dpo_operator.kube import Kube
from dpojob_api.spec import DPOJobSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dpo-operator"
SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
OLDEST, NEWEST = Version("1.28"), Version("1.34")
VERSIONS = sorted(
    (m[1] for d in SCHEMAS.iterdir() if (m := re.fullmatch(r"v(\d+\.\d+)\.0-local-strict", d.name))),
    key=Version,
)
VERSIONS = [v for v in VERSIONS if OLDEST <= Version(v) <= NEWEST]
# Kinds defined by CRDs that kubernetes-validate has no schema for (it ships the built-in API only): the
# Prometheus operator's ServiceMonitor, PodMonitor and PrometheusRule: checked against that operator's own
# schemas instead (test_the_monitoring_objects_match_the_prometheus_operator_schemas).
CUSTOM_GROUPS = {"monitoring.coreos.com"}


def test_the_schemas_cover_1_28_to_1_34() -> None:
    assert VERSIONS[0] == "1.28" and VERSIONS[-1] == "1.34", VERSIONS
    assert len(VERSIONS) == 7


@cache
def _registry(version: str) -> Registry:
    definitions = json.loads((SCHEMAS / f"v{version}.0-local-strict" / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@cache
def _validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    # kubernetes-validate's file names: rbac.authorization.k8s.io/v1 -> rbac-v1, v1 -> v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = SCHEMAS / f"v{version}.0-local-strict" / f"{kind.lower()}-{group_version}.json"
    assert path.exists(), f"Kubernetes {version} has no {kind} in {api_version}"
    schema = json.loads(path.read_text())
    return jsonschema.Draft202012Validator(schema, registry=Resource.from_contents(schema) @ _registry(version))


def _schema_quirk(error: jsonschema.ValidationError, version: str) -> bool:
    """Where the published schema is stricter than the API server. Up to 1.28 the OpenAPI of
    PodFailurePolicyRule lists onPodConditions as required (the Go field lacked omitempty), yet the server
    accepts a rule with onExitCodes only (the documented example since 1.26); 1.29 corrected the schema."""
    path = list(error.absolute_path)
    return (
        Version(version) < Version("1.29")
        and error.validator == "required"
        and "'onPodConditions'" in error.message
        and path[-3:-1] == ["podFailurePolicy", "rules"]
        and "onExitCodes" in error.instance
    )


def schema_errors(obj: dict[str, Any], version: str) -> list[str]:
    validator = _validator(version, obj["kind"], obj["apiVersion"])
    name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    return [
        f"{name} {'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(obj)
        if not _schema_quirk(e, version)
    ]


def _enabled_switches(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every boolean `enabled` in values.yaml."""
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += _enabled_switches(value, f"{prefix}{key}.")
        elif key == "enabled" and isinstance(value, bool):
            found.append(f"{prefix}{key}")
    return found


def _example_values() -> list[Path]:
    patterns = ("values-*.yaml", "*-values.yaml", "examples/*.yaml", "ci/*.yaml")
    return sorted({p for pattern in patterns for p in CHART.glob(pattern)})


CHART_VARIANTS = {
    "defaults": (),
    "namespaced": ("--set", "watchNamespaces={a,b}"),
    "every-switch-on": tuple(
        a
        for switch in _enabled_switches(yaml.safe_load((CHART / "values.yaml").read_text()))
        for a in ("--set", f"{switch}=true")
    ),
    **{f"values-file-{p.relative_to(CHART)}": ("-f", str(p)) for p in _example_values()},
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", list(CHART_VARIANTS))
def test_chart_objects_match_the_kubernetes_schema(helm: Path, variant: str, version: str) -> None:
    argv = [str(helm), "template", "r", str(CHART), "-n", "dpo-operator", "--kube-version", f"{version}.0"]
    result = subprocess.run([*argv, *CHART_VARIANTS[variant]], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    checked = [o for o in objects if o["apiVersion"].split("/")[0] not in CUSTOM_GROUPS]
    assert {"Deployment", "CustomResourceDefinition", "ServiceAccount"} <= {o["kind"] for o in checked}
    assert not [error for obj in checked for error in schema_errors(obj, version)]


def test_the_monitoring_objects_match_the_prometheus_operator_schemas(helm: Path) -> None:
    """The ServiceMonitor, PodMonitor and PrometheusRule (every switch on) against prometheus-operator's CRD
    schemas (monitoring_schemas: the validators generated from them), and a broken one is refused."""
    argv = [str(helm), "template", "r", str(CHART), "-n", "dpo-operator", *CHART_VARIANTS["every-switch-on"]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    monitoring = [o for o in yaml.safe_load_all(result.stdout) if o and o["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert sorted(o["kind"] for o in monitoring) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    assert monitoring_schemas.validate(monitoring) == [[], [], []]
    broken = {**monitoring[0], "spec": {**monitoring[0]["spec"], "selector": "not a selector"}}
    (problems,) = monitoring_schemas.validate([broken])
    assert problems and "selector" in problems[0]


DPOJOB: dict[str, Any] = {
    "apiVersion": "dpo-operator.io/v1alpha1",
    "kind": "DPOJob",
    "metadata": {
        "name": "llama",
        "namespace": "ml",
        "uid": "u-1",
        "generation": 3,
        "labels": {"kueue.x-k8s.io/queue-name": "gpus"},
    },
    "spec": {
        "output": {"hub": {"repoId": "org/llama-dpo"}},
        "hubTokenSecretRef": {"name": "hf", "key": "token"},
        "runtime": {
            "gpus": 2,
            "nodeSelector": {"gpu": "a100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "h100"]}]}
                        ]
                    }
                }
            },
            "priorityClassName": "training",
            "serviceAccountName": "trainer",
            "imagePullSecrets": [{"name": "regcred"}],
            "checkpointVolume": {"claimName": "ckpt"},
            "cacheVolume": {"claimName": "hf-cache"},
            "backoffLimit": 4,
            "activeDeadlineSeconds": 3600,
        },
    },
}
TRAINER_ENV = [
    {"name": "HF_ENDPOINT", "value": "http://hub"},
    {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}},
]


def operator_objects() -> list[dict[str, Any]]:
    """The Job (every newer-server feature on), its ConfigMap and an Event, as the operator sends them."""
    spec = DPOJobSpec.model_validate(DPOJOB["spec"])
    features = manifests.ServerFeatures(pod_failure_policy=True, job_suspend=True)
    job = manifests.build_job(DPOJOB, spec, 3, TRAINER_ENV, features=features)
    assert job["spec"]["suspend"] is True and job["spec"]["podFailurePolicy"]["rules"]
    quickstart = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    quickstart["metadata"].update(namespace="default", uid="u-2")
    plain = manifests.build_job(quickstart, DPOJobSpec.model_validate(quickstart["spec"]), 1, features=features)
    sent: list[dict[str, Any]] = []
    kube = object.__new__(Kube)  # only post_event's body is wanted: no client, no cluster
    kube.instance = "dpo-operator-0"
    kube.request = lambda method, path, body=None, **_: sent.append(body)  # type: ignore[method-assign]
    kube.post_event(DPOJOB, "Warning", "Diverged", "loss is nan")
    (event,) = sent
    return [job, plain, manifests.build_config_map(DPOJOB, 3), {"apiVersion": "v1", "kind": "Event", **event}]


@pytest.mark.parametrize("version", VERSIONS)
def test_operator_manifests_match_the_kubernetes_schema(version: str) -> None:
    assert not [error for obj in operator_objects() for error in schema_errors(obj, version)]


def test_the_schema_check_catches_fields_a_server_version_does_not_know() -> None:
    job = copy.deepcopy(operator_objects()[0])
    job["spec"]["podFailurePolicy"]["rules"][1]["onExitCode"] = job["spec"]["podFailurePolicy"]["rules"][1].pop(
        "onExitCodes"
    )
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    errors = schema_errors(job, VERSIONS[-1])
    assert any("onExitCode'" in e for e in errors) and any("'gpus'" in e for e in errors), errors
    # Job spec.managedBy exists from 1.30: the oldest schema rejects it, the newest accepts it.
    newer = copy.deepcopy(operator_objects()[0])
    newer["spec"]["managedBy"] = "kueue.x-k8s.io/multikueue"
    assert any("managedBy" in e for e in schema_errors(newer, "1.28"))
    assert not schema_errors(newer, VERSIONS[-1])


# CEL: every rule of the CRD, evaluated the way the API server does: `self` is the object the rule is attached
# to, numbers are typed by the schema (a `number` field is a double even when written as 1), and a rule on an
# optional object that is absent is not evaluated.
CEL_SCHEMA = crd.build_crd(cel=True)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
OUT = {"directory": "/o"}
# message -> (a spec the rule accepts, a spec only this rule rejects)
CEL_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "output needs hub or directory (or both): the merged model has to go somewhere": (
        {"output": {"hub": {"repoId": "org/m"}}},
        {"output": {}},
    ),
    "lossWeights needs one weight per lossType entry": (
        {"output": OUT, "dpo": {"lossType": ["sigmoid", "sft"], "lossWeights": [1, 0.5]}},
        {"output": OUT, "dpo": {"lossWeights": [1, 2]}},
    ),
    "lossType exo_pair and robust need labelSmoothing > 0": (
        {"output": OUT, "dpo": {"lossType": ["robust"], "labelSmoothing": 0.1}},
        {"output": OUT, "dpo": {"lossType": ["robust"]}},
    ),
    "maxPromptLength must be less than maxLength": (
        {"output": OUT, "dpo": {"maxPromptLength": 1024, "maxLength": 2048}},
        {"output": OUT, "dpo": {"maxPromptLength": 1024}},
    ),
    "gates.notWorseThanTarget needs hub: it compares with the model at hub.revision": (
        {"output": {"hub": {"repoId": "org/m"}, "gates": {"notWorseThanTarget": True}}},
        {"output": {**OUT, "gates": {"notWorseThanTarget": True}}},
    ),
}


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value as the API server hands it to CEL: typed by its structural schema."""
    kind = schema.get("type")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, properties.get(k, extra)) for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(item, schema.get("items") or {}) for item in value])
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    return celpy.json_to_cel(value)


def _rules(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict, dict]]:
    """(path below spec, schema node, rule) for every x-kubernetes-validations rule."""
    found = [(path, schema, rule) for rule in schema.get(crd.CEL_KEY, [])]
    for name, child in (schema.get("properties") or {}).items():
        found += _rules(child, (*path, name))
    return found


RULES = _rules(CEL_SCHEMA)


@cache
def _program(rule: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(rule))


def failed_rules(spec: dict[str, Any]) -> set[str]:
    """Messages of the CRD's CEL rules this spec breaks."""
    failed = set()
    for path, node, rule in RULES:
        target: Any = spec
        for name in path:
            target = target.get(name) if isinstance(target, dict) else None
        if target is None:
            continue
        result = _program(rule["rule"]).evaluate({"self": to_cel(target, node)})
        assert isinstance(result, celtypes.BoolType), f"{rule['rule']}: {result!r}"
        if not result:
            failed.add(rule["message"])
    return failed


def test_every_cel_rule_compiles_and_has_a_case() -> None:
    assert {rule["message"] for _, _, rule in RULES} == set(CEL_CASES)
    assert {path for path, _, _ in RULES} == {(), ("dpo",), ("output",)}
    for _, _, rule in RULES:
        _program(rule["rule"])


@pytest.mark.parametrize("message", list(CEL_CASES))
def test_cel_rule_accepts_a_valid_spec_and_rejects_an_invalid_one(message: str) -> None:
    from pydantic import ValidationError

    good, bad = CEL_CASES[message]
    assert failed_rules(good) == set()
    DPOJobSpec.model_validate(good)  # the operator's model agrees both ways
    assert failed_rules(bad) == {message}
    with pytest.raises(ValidationError):
        DPOJobSpec.model_validate(bad)


def test_the_examples_pass_every_cel_rule() -> None:
    specs = [
        document["spec"]
        for path in sorted((ROOT / "examples").rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if isinstance(document, dict) and document.get("kind") == "DPOJob"
    ]
    assert len(specs) >= 2
    for spec in specs:
        assert failed_rules(spec) == set()
