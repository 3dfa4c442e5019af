"""Read the DPOJob document a user applies with kubectl, and make its local paths absolute.

Only pydantic and PyYAML are imported here, so a bad spec fails in well under a second.
"""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpo_trainer.errors import DatasetError, InvalidSpec, ModelLoadError
from dpojob_api.progress import SPEC_DIGEST_ENV
from dpojob_api.spec import (
    KIND,
    DatasetSource,
    DPOJob,
    DPOJobSpec,
    describe_validation_error,
    spec_hash,
)


def read_job(path: Path) -> dict[str, Any]:
    """The one DPOJob document of SPEC.yaml (possibly multi-document), as written: no defaults filled in."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise InvalidSpec(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InvalidSpec(f"{path} is not UTF-8 text") from None
    expected = os.environ.get(SPEC_DIGEST_ENV)
    if expected and hashlib.sha256(raw).hexdigest() != expected:
        raise InvalidSpec(
            f"{path} is not the spec the operator wrote for this run (its ConfigMap was replaced after the Job was "
            "created); nothing was trained. Retry the run (the dpo-operator.io/retry annotation) to write it again"
        )
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
    return jobs[0]


def parse_job(document: dict[str, Any]) -> DPOJob:
    """Validate a DPOJob document (read_job's)."""
    try:
        return DPOJob.model_validate(document)
    except ValidationError as exc:
        raise InvalidSpec(describe_validation_error(exc, prefix="")) from None


def load_job(path: Path) -> DPOJob:
    """Parse SPEC.yaml (possibly multi-document) and validate its DPOJob document."""
    return parse_job(read_job(path))


def run_metadata(document: dict[str, Any], job: DPOJob) -> dict[str, Any]:
    """What the card and the push say about the run: the DPOJob's name (and namespace), its metadata.generation (the
    run's, in the operator's ConfigMap) and the operator's spec hash of the spec as written
    (status.internal.specHash)."""
    generation = job.metadata.get("generation")
    return {
        "name": job.metadata.get("name", "model"),
        "namespace": job.metadata.get("namespace"),
        "given_spec": spec_as_yaml_dict(job.spec),
        "generation": generation if isinstance(generation, int) and generation > 0 else None,
        "spec_hash": spec_hash(document["spec"]),
    }


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
