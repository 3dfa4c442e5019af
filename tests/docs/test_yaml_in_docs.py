"""Every YAML a user may copy from the docs and examples is valid: DPOJobs pass the operator's own validation,
spec fragments the spec model, chart values the chart's values schema, Kubernetes objects the current API's models
(the kubernetes client's, unknown fields refused). Kinds of other projects (Kueue, Argo CD, Flux) only parse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kubernetes import client
from pydantic import ValidationError

from dpo_operator.reconciler import validate_spec
from dpojob_api.spec import KIND, DataSpec, DPOJob, DPOJobSpec

ROOT = Path(__file__).resolve().parents[2]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", *sorted((ROOT / "examples").rglob("*.md"))]
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
KUBERNETES_MODELS = {
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): client.V1ClusterRole,
    ("rbac.authorization.k8s.io/v1", "Role"): client.V1Role,
    ("v1", "PersistentVolumeClaim"): client.V1PersistentVolumeClaim,
    ("v1", "Secret"): client.V1Secret,
    ("v1", "Namespace"): client.V1Namespace,
}
"""Kinds of the core API the docs show, validated by the kubernetes client's models."""
FOREIGN_GROUPS = ("kueue.x-k8s.io/", "argoproj.io/", "source.toolkit.fluxcd.io/", "kustomize.toolkit.fluxcd.io/")


def yaml_blocks() -> list[tuple[str, str]]:
    blocks = []
    for path in DOCS:
        text = path.read_text()
        for number, block in enumerate(re.findall(r"```yaml\n(.*?)```", text, re.S), start=1):
            blocks.append((f"{path.relative_to(ROOT)} block {number}", block))
    return blocks


def check_document(where: str, document: Any) -> str:
    """Validate one YAML document; returns what it was taken for."""
    assert isinstance(document, dict), f"{where}: not a mapping"
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if kind == KIND:
        DPOJob.model_validate(document)
        _, error = validate_spec(document["spec"])
        assert error is None or "output.directory" in error, f"{where}: the operator would refuse it: {error}"
        return "DPOJob"
    if kind is not None:
        if (api_version, kind) in KUBERNETES_MODELS:
            KUBERNETES_MODELS[api_version, kind].model_validate(document)
            return kind
        assert str(api_version).startswith(FOREIGN_GROUPS), f"{where}: {api_version} {kind} has no validator here"
        return "foreign"
    if "data" in document and set(document) <= {"data"} and "resource.customizations.health" in str(document):
        return "argocd-cm"
    if set(document) == {"configs"} and set(document["configs"]) == {"cm"}:
        assert all(key.startswith("resource.customizations.") for key in document["configs"]["cm"]), where
        return "argo-cd chart values"
    if set(document) <= {field.alias or name for name, field in DPOJobSpec.model_fields.items()} | {"output"}:
        try:
            DPOJobSpec.model_validate({"output": {"directory": "/output/m"}, **document})
            return "spec fragment"
        except ValidationError:
            if not set(document) <= set(DataSpec.model_fields):
                raise
        DataSpec.model_validate(document)  # spec.data's content (sft/dpo sources), as spec-reference.md shows
        return "data fragment"
    values = yaml.safe_load((ROOT / "charts/dpo-operator/values.yaml").read_text())
    schema = json.loads((ROOT / "charts/dpo-operator/values.schema.json").read_text())
    jsonschema.validate({**values, **document}, schema)
    return "chart values"


@pytest.mark.parametrize(("where", "block"), yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_every_yaml_block_in_the_docs_is_valid(where: str, block: str) -> None:
    for document in yaml.safe_load_all(block):
        if document is not None:
            check_document(where, document)


@pytest.mark.parametrize("path", EXAMPLES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLES])
def test_every_example_file_is_valid(path: Path) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        if document is not None and "resources" not in document:  # kustomization.yaml lists files only
            check_document(str(path.relative_to(ROOT)), document)


def test_the_checks_refuse_what_they_should() -> None:
    with pytest.raises(ValidationError):
        check_document("typo", {"output": {"hub": {"repoID": "o/m"}}})
    with pytest.raises(ValidationError):
        check_document("typo", {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "spec": {"acessModes": []}})
    with pytest.raises(jsonschema.ValidationError):
        check_document("typo", {"trainerEnvs": []})
