"""Read the DPOJob document a user applies with kubectl, and make its local paths absolute.

Only pydantic and PyYAML are imported here, so a bad spec fails in well under a second.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpo_operator.spec import (
    KIND,
    DatasetSource,
    DPOJob,
    DPOJobSpec,
    describe_validation_error,
)
from dpo_trainer.errors import DatasetError, InvalidSpec, ModelLoadError


def load_job(path: Path) -> DPOJob:
    """Parse SPEC.yaml (possibly multi-document) and validate its DPOJob document."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidSpec(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidSpec(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        kinds = [d.get("kind") if isinstance(d, dict) else type(d).__name__ for d in documents]
        raise InvalidSpec(f"{path} must hold exactly one document of kind {KIND}, found kinds {kinds}")
    if "spec" not in jobs[0]:
        raise InvalidSpec(f"{path}: the {KIND} has no spec")
    try:
        return DPOJob.model_validate(jobs[0])
    except ValidationError as exc:
        raise InvalidSpec(describe_validation_error(exc, prefix="")) from None


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything absolute, dotted-relative, or existing is a local path."""
    return name.startswith(("/", "./", "../", "~")) or os.path.exists(name)


def _resolve_source(source: DatasetSource | None, field_path: str) -> None:
    if source is None or source.files is None:
        return
    resolved = []
    for pattern in source.files.paths:
        absolute = os.path.abspath(os.path.expanduser(pattern))
        if not glob.glob(absolute):
            raise DatasetError(f"{field_path}.files.paths: no file matches {pattern!r} (looked for {absolute})")
        resolved.append(absolute)
    source.files.paths = resolved


def resolve_local_paths(spec: DPOJobSpec) -> DPOJobSpec:
    """Resolve relative paths against the current directory and fail fast on missing local inputs."""
    spec = spec.model_copy(deep=True)
    if looks_like_path(spec.model.name):
        model_path = os.path.abspath(os.path.expanduser(spec.model.name))
        if not os.path.isdir(model_path):
            raise ModelLoadError(f"model.name: local model directory {model_path} does not exist")
        spec.model.name = model_path
    data = spec.data
    if data.sft is not None and spec.sft.enabled:
        _resolve_source(data.sft.source, "data.sft.source")
    if data.dpo is not None:
        _resolve_source(data.dpo.source, "data.dpo.source")
        _resolve_source(data.dpo.eval_source, "data.dpo.evalSource")
    if spec.output.directory:
        spec.output.directory = os.path.abspath(os.path.expanduser(spec.output.directory))
    spec.checkpointing.directory = os.path.abspath(os.path.expanduser(spec.checkpointing.directory))
    return spec


def spec_as_yaml_dict(spec: DPOJobSpec) -> dict[str, Any]:
    """The spec as users write it (camelCase), for the model card and fingerprints."""
    return spec.model_dump(mode="json", by_alias=True)
