"""Generate the Markdown reference of the DPOJob spec from the pydantic models.

`python -m dpo_dev.docs > docs/spec-reference.md` regenerates the committed file; a test fails when they
drift, so the reference can never disagree with what the operator and the trainer accept. Types, bounds and
allowed values come from the same JSON schema the CRD is built from; defaults come from the models
themselves (the schema omits defaults made by factories, e.g. list defaults).
"""

from __future__ import annotations

import json
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dpojob_api.spec import API_GROUP, API_VERSION, KIND, PRESETS, DPOJobSpec

from .crd import CRD_FILE

DOCS_FILE = "docs/spec-reference.md"


@dataclass(frozen=True)
class Row:
    """One field of the reference table."""

    path: str
    type: str
    default: str
    allowed: str
    description: str


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Follow $ref and unwrap `X | None`; returns the node and whether null is allowed."""
    nullable = False
    variants = node.get("anyOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        nullable = len(non_null) < len(variants)
        node = {**non_null[0], **{k: v for k, v in node.items() if k != "anyOf"}}
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node, nullable


def _type(node: dict[str, Any], defs: dict[str, Any]) -> str:
    kind = node.get("type")
    if kind == "array":
        item, _ = _resolve(node["items"], defs)
        return f"list of {_type(item, defs)}"
    if kind == "object" and "properties" not in node:
        extra = node.get("additionalProperties")
        return f"map of string to {_type(extra, defs)}" if isinstance(extra, dict) else "object (free-form)"
    return kind or "any"


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _allowed(node: dict[str, Any], defs: dict[str, Any]) -> str:
    """Enum values and bounds, as a reader would say them."""
    if node.get("type") == "array":
        item, _ = _resolve(node["items"], defs)
        parts = [f"each: {_allowed(item, defs)}"] if _allowed(item, defs) else []
        if "minItems" in node:
            parts.append(f"at least {node['minItems']} item{'s' if node['minItems'] > 1 else ''}")
        return "; ".join(parts)
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, symbol in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in node:
            parts.append(f"{symbol} {_number(node[key])}")
    if "minLength" in node and node["minLength"] > 1:
        parts.append(f"at least {node['minLength']} characters")
    elif node.get("minLength") == 1:
        parts.append("non-empty")
    if "maxLength" in node:
        parts.append(f"at most {node['maxLength']} characters")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    if "oneOf" in node:
        parts.append("exactly one of " + ", ".join(f"`{next(iter(v['required']))}`" for v in node["oneOf"]))
    return "; ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see fields below"
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f"`{json.dumps(value)[1:-1]}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def _nested_model(field: FieldInfo) -> type[BaseModel] | None:
    """The spec model a field holds (directly, optionally, or as list items), if any."""
    candidates = [field.annotation]
    while candidates:
        annotation = candidates.pop()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
            candidates.extend(typing.get_args(annotation))
    return None


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def rows(model: type[BaseModel], schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> Iterator[Row]:
    """Every field under `model`, depth first, with its camelCase path (list items as `[]`)."""
    for name, field in model.model_fields.items():
        alias = field.alias or name
        node, nullable = _resolve(schema["properties"][alias], defs)
        path = f"{prefix}{alias}"
        type_ = _type(node, defs) + (" or null" if nullable and node.get("type") != "object" else "")
        yield Row(path, type_, _default(field), _allowed(node, defs), node.get("description", ""))
        nested = _nested_model(field)
        if nested is not None:
            item = _resolve(node["items"], defs)[0] if node.get("type") == "array" else node
            yield from rows(nested, item, defs, f"{path}[]." if node.get("type") == "array" else f"{path}.")


class _TemplateDumper(yaml.SafeDumper):
    """Writes strings with line breaks double-quoted with \\n, the way users write templates in a DPOJob."""


_TemplateDumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None),
)


def _table(table_rows: list[Row]) -> str:
    lines = ["| field | type | default | allowed | description |", "|---|---|---|---|---|"]
    lines += [
        f"| `{r.path}` | {r.type} | {_cell(r.default)} | {_cell(r.allowed)} | {_cell(r.description)} |"
        for r in table_rows
    ]
    return "\n".join(lines)


def spec_rows() -> list[Row]:
    """One row per field of DPOJobSpec, in declaration order."""
    schema = DPOJobSpec.model_json_schema(by_alias=True)
    return list(rows(DPOJobSpec, schema, schema.get("$defs", {})))


def render() -> str:
    """The reference as committed in docs/spec-reference.md."""
    schema = DPOJobSpec.model_json_schema(by_alias=True)
    all_rows = spec_rows()
    top = [r for r in all_rows if "." not in r.path]
    sections = [
        "<!-- Generated by `python -m dpo_dev.docs` from operator/dpojob_api/spec.py. Do not edit. -->",
        f"# {KIND} spec reference",
        f"`apiVersion: {API_GROUP}/{API_VERSION}`, `kind: {KIND}`. {schema['description']} Field names are "
        f"camelCase; paths below are relative to `.spec` (`[]` marks the items of a list). The CRD "
        f"(`{CRD_FILE}`) is generated from the same models, so `kubectl explain dpojob.spec.<path>` prints the "
        "same descriptions. How the trainer uses these fields: [trainer.md](trainer.md).",
        "## spec",
        _table(top),
    ]
    for row in top:
        below = [r for r in all_rows if r.path.startswith((f"{row.path}.", f"{row.path}[]."))]
        if below:
            sections += [f"## spec.{row.path}", _cell(row.description), _table(below)]
    for name, preset in PRESETS.items():
        sections += [
            f"## Preset `{name}`",
            f"`data.preset: {name}` fills `data.sft` and `data.dpo` with the values below; keys a stage sets "
            "itself win, and a stage that sets its own `source` drops the preset's `evalSource`.",
            f"```yaml\n{yaml.dump(preset, Dumper=_TemplateDumper, sort_keys=False, width=100)}```",
        ]
    return "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
