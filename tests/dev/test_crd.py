"""The committed CRD is generated from the pydantic models and is a valid structural schema."""

from pathlib import Path

import jsonschema
import pytest
import yaml

from dpo_dev import crd
from dpojob_api.spec import DPOJobSpec

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_models() -> None:
    committed = (ROOT / crd.CRD_FILE).read_text()
    assert committed == crd.render(), "crds/ drifted from the spec: run `python -m dpo_dev.crd > " + crd.CRD_FILE + "`"


def _walk(node: dict, path: str = ""):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "anyOf" not in node and "title" not in node, path
        assert "type" in node, f"{path} has no type (structural schemas need one everywhere)"
        if node["type"] == "object" and path.startswith(".spec"):
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path
    spec = schema["properties"]["spec"]["properties"]
    assert spec["dpo"]["properties"]["beta"]["description"].startswith("Strength")
    assert spec["quantization"]["properties"]["mode"]["enum"] == ["4bit", "none"]


def test_examples_validate_against_the_crd_schema() -> None:
    schema = crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    validator = jsonschema.Draft4Validator(schema)
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "DPOJob":
                errors = [e.message for e in validator.iter_errors(document)]
                assert not errors, f"{path.name}: {errors}"
                DPOJobSpec.model_validate(document["spec"])


def test_printer_columns_and_names() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    columns = {c["name"]: c.get("priority", 0) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": 0,
        "Reason": 0,
        "Stage": 0,
        "Progress": 0,
        "ETA": 0,
        "Loss": 0,
        "Train-Acc": 0,
        "Eval-Acc": 0,
        "Eval-Margin": 1,
        "SFT": 1,
        "Model": 1,
        "Age": 0,
    }, "priority 1: only with -o wide"
    assert version["subresources"] == {"status": {}}
    assert crd.build_crd()["spec"]["names"]["shortNames"] == ["dpo"]


def test_cel_rules_match_the_model_validators() -> None:
    """Every CEL rule (apply-time on >= 1.25) mirrors a pydantic validator: a spec each rule rejects, the model
    rejects too; the rules' defaults are the model's."""
    from pydantic import ValidationError

    assert "x-kubernetes-validations" not in crd.render(), "the committed CRD must install on Kubernetes 1.20"
    schema = crd.build_crd(cel=True)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]

    def rules(node: dict) -> dict[str, str]:
        found = {rule["message"]: rule["rule"] for rule in node.get("x-kubernetes-validations", [])}
        for child in (node.get("properties") or {}).values():
            found |= rules(child)
        return found

    out = {"directory": "/o"}
    rejected_by = {
        "output needs hub or directory (or both): the merged model has to go somewhere": {},
        "lossWeights needs one weight per lossType entry": {"output": out, "dpo": {"lossWeights": [1, 2]}},
        "lossType exo_pair and robust need labelSmoothing > 0": {"output": out, "dpo": {"lossType": ["robust"]}},
        "maxPromptLength must be less than maxLength": {"output": out, "dpo": {"maxPromptLength": 1024}},
        "gates.notWorseThanTarget needs hub: it compares with the model at hub.revision": {
            "output": {**out, "gates": {"notWorseThanTarget": True}}
        },
    }
    found = rules(schema)
    assert set(found) == set(rejected_by)
    for bad in rejected_by.values():
        with pytest.raises(ValidationError):
            DPOJobSpec.model_validate(bad)
    dpo = DPOJobSpec.model_fields["dpo"].default_factory()  # type: ignore[misc]
    lengths = found["maxPromptLength must be less than maxLength"]
    assert f": {dpo.max_prompt_length})" in lengths and f": {dpo.max_length})" in lengths
