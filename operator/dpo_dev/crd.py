"""Generate the DPOJob CustomResourceDefinition from the pydantic models.

`python -m dpo_dev.crd > crds/dpojobs.dpo-operator.io.yaml` regenerates the committed file and
`python -m dpo_dev.crd --helm > charts/dpo-operator/templates/crd.yaml` the Helm chart's template of the
same CRD; tests fail when either drifts. Pydantic emits JSON Schema 2020-12; Kubernetes wants a structural
OpenAPI v3.0 subset, so references are inlined, Optional becomes nullable, and free-form maps keep unknown
fields. Defaults stay in pydantic (one place) and are written into the descriptions for `kubectl explain`.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from dpojob_api.spec import API_GROUP, API_VERSION, KIND, PLURAL, DPOJobSpec
from dpojob_api.status import DPOJobStatus

CRD_NAME = f"{PLURAL}.{API_GROUP}"
CRD_FILE = f"crds/{CRD_NAME}.yaml"
HELM_CRD_FILE = "charts/dpo-operator/templates/crd.yaml"

_KEPT_KEYWORDS = (
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "required",
    "format",
)
# CEL rules: enforced at apply time by Kubernetes >= 1.25. kubectl's client-side validation against an older
# server rejects the unknown keyword, so the committed CRD (which must install on 1.20) leaves them out;
# `python -m dpo_dev.crd --cel` renders them for newer clusters. The operator enforces the same rules.
CEL_KEY = "x-kubernetes-validations"


def to_structural(schema: dict[str, Any], defs: dict[str, Any], cel: bool = False) -> dict[str, Any]:
    """Convert one pydantic JSON-Schema node to a Kubernetes structural schema node (CEL rules only if cel)."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return to_structural(merged, defs, cel)
    variants = schema.get("anyOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express union {variants} structurally")
        inner = to_structural(non_null[0], defs, cel)
        outer = {k: v for k, v in schema.items() if k not in ("anyOf", "default", "title")}
        merged = {**inner, **{k: v for k, v in to_structural(outer, defs, cel).items() if k != "type"}}
        if len(non_null) < len(variants):
            merged["nullable"] = True
        return merged

    node: dict[str, Any] = {k: schema[k] for k in _KEPT_KEYWORDS if k in schema}
    if cel and CEL_KEY in schema:
        node[CEL_KEY] = schema[CEL_KEY]
    if "const" in schema:
        node["enum"] = [schema["const"]]
    if "exclusiveMinimum" in schema:
        node["minimum"], node["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        node["maximum"], node["exclusiveMaximum"] = schema["exclusiveMaximum"], True
    if "default" in schema and schema["default"] not in (None, [], {}):
        default = json.dumps(schema["default"]) if not isinstance(schema["default"], str) else schema["default"]
        node["description"] = f"{node.get('description', '').rstrip()} Default: {default}.".lstrip()
    if "oneOf" in schema:
        node["oneOf"] = schema["oneOf"]
    if "properties" in schema:
        node["type"] = "object"
        node["properties"] = {name: to_structural(sub, defs, cel) for name, sub in schema["properties"].items()}
    elif isinstance(schema.get("additionalProperties"), dict):
        node["additionalProperties"] = to_structural(schema["additionalProperties"], defs, cel)
    elif schema.get("type") == "object":
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in schema:
        node["items"] = to_structural(schema["items"], defs, cel)
    return node


def openapi_schema(model: type[BaseModel], cel: bool = False) -> dict[str, Any]:
    """Structural schema of a pydantic model (by alias, i.e. camelCase field names)."""
    raw = model.model_json_schema(by_alias=True)
    return to_structural(raw, raw.get("$defs", {}), cel)


def build_crd(cel: bool = False) -> dict[str, Any]:
    """The full CRD object; cel adds the x-kubernetes-validations rules (Kubernetes >= 1.25)."""
    spec_schema = openapi_schema(DPOJobSpec, cel)
    status_schema = openapi_schema(DPOJobStatus)
    columns = [
        ("Phase", "string", ".status.phase", "Pending, Running, Succeeded, Failed or Suspended", 0),
        (
            "Reason",
            "string",
            ".status.reason",
            "What the phase does not say: Queued, ImagePullBackOff, HubAuthError…",
            0,
        ),
        ("Stage", "string", ".status.stage", "Trainer stage: data, sft, sft_merge, dpo_data, dpo, dpo_merge, …", 0),
        ("Progress", "integer", ".status.progress.percent", "Percent of the whole run done", 0),
        ("ETA", "string", ".status.progress.eta", "Estimated time left in the whole run", 0),
        ("Loss", "number", ".status.metrics.loss", "The current training stage's latest loss (SFT, then DPO)", 0),
        ("Train-Acc", "number", ".status.rewards.accuracies", "Latest DPO rewards/accuracies (train batches)", 0),
        ("Eval-Acc", "number", ".status.evalRewards.accuracies", "Latest eval_rewards/accuracies (the gates')", 0),
        ("Eval-Margin", "number", ".status.evalRewards.margins", "Latest eval_rewards/margins", 1),
        ("SFT", "string", ".status.sftModel.source", "trained, reused (from another DPOJob) or waiting", 1),
        ("Model", "string", ".status.model.repoId", "Hub repository of the pushed model", 1),
        ("Age", "date", ".metadata.creationTimestamp", "", 0),
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "dpo-operator"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["dpo"],
                "categories": ["all", "ml", "training"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": n,
                            "type": t,
                            "jsonPath": p,
                            **({"description": d} if d else {}),
                            **({"priority": priority} if priority else {}),
                        }
                        for n, t, p, d, priority in columns
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "DPOJob aligns a language model with preference data: QLoRA "
                            "supervised fine-tuning, then Direct Preference Optimization (TRL), then a "
                            "merged model pushed to the Hugging Face Hub.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes repeated sub-schemas out in full: anchors and aliases confuse reviewers and some tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(cel: bool = False) -> str:
    """The CRD as YAML text; without cel it is the file committed in crds/."""
    header = "# Generated by `python -m dpo_dev.crd` from dpojob_api/spec.py. Do not edit.\n"
    return header + yaml.dump(build_crd(cel), Dumper=_PlainDumper, sort_keys=False, width=100)


# The chart installs the CRD as a template (not from crds/, which `helm upgrade` never touches): gated by
# crds.enabled, kept on uninstall by crds.keep, and with the CEL rules only where the server enforces them.
_HELM_HEAD = """{{- /* Generated by `python -m dpo_dev.crd --helm` from dpojob_api/spec.py. Do not edit. */}}
{{- if .Values.crds.enabled }}
apiVersion: %(apiVersion)s
kind: %(kind)s
metadata:
  name: %(name)s
  labels:
    {{- include "dpo-operator.labels" . | nindent 4 }}
  {{- if .Values.crds.keep }}
  annotations:
    helm.sh/resource-policy: keep
  {{- end }}
"""
_HELM_CEL_GATE = '{{- if semverCompare ">=1.25-0" .Capabilities.KubeVersion.Version }}'


def _gate_cel(text: str) -> str:
    """Wrap every x-kubernetes-validations block (the key and its deeper or `- ` lines) in the version gate."""
    out: list[str] = []
    gate_indent: int | None = None
    for line in text.splitlines():
        content = line.lstrip(" ")
        indent = len(line) - len(content)
        if gate_indent is not None and (indent < gate_indent or (indent == gate_indent and content[:2] != "- ")):
            out.append(" " * gate_indent + "{{- end }}")
            gate_indent = None
        if content.startswith(f"{CEL_KEY}:"):
            out.append(" " * indent + _HELM_CEL_GATE)
            gate_indent = indent
        out.append(line)
    if gate_indent is not None:
        out.append(" " * gate_indent + "{{- end }}")
    return "\n".join(out) + "\n"


def render_helm() -> str:
    """The chart's templates/crd.yaml: this CRD (CEL rules gated on Kubernetes >= 1.25) plus Helm directives."""
    crd = build_crd(cel=True)
    body = yaml.dump({"spec": crd["spec"]}, Dumper=_PlainDumper, sort_keys=False, width=100)
    # Text that Helm would read as an action ("{{" in a description) is emitted literally.
    body = re.sub(r"\{\{|\}\}", lambda m: '{{ "' + m.group() + '" }}', body)
    head = _HELM_HEAD % {"apiVersion": crd["apiVersion"], "kind": crd["kind"], "name": CRD_NAME}
    return head + _gate_cel(body) + "{{- end }}\n"


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.stdout.write(render_helm() if "--helm" in arguments else render(cel="--cel" in arguments))
