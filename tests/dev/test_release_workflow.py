"""The release workflow (.github/workflows/release.yml), read as YAML: on a v* tag it builds both images for
amd64 and arm64 plus the CUDA 12 trainer, pushes and signs them, pushes and signs the chart (OCI) and attaches
the install manifest. actionlint (in .ci/run) checks the rest."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
JOBS: dict[str, Any] = WORKFLOW["jobs"]


def steps(job: str) -> list[dict[str, Any]]:
    return JOBS[job]["steps"]


def uses(job: str, action: str) -> list[dict[str, Any]]:
    return [s for s in steps(job) if s.get("uses", "").split("@")[0] == action]


def runs(job: str) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def test_runs_on_version_tags_only() -> None:
    trigger = WORKFLOW.get("on", WORKFLOW.get(True))  # YAML 1.1 reads a bare `on` as true
    assert trigger == {"push": {"tags": ["v*"]}}
    assert WORKFLOW["permissions"] == {"contents": "read"}


def test_every_action_is_pinned_at_least_by_major_version() -> None:
    for job in JOBS:
        for step in steps(job):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@(v\d+(\.\d+)*|[0-9a-f]{40})", step["uses"]), step["uses"]


def test_images_are_built_for_amd64_and_arm64_pushed_and_signed() -> None:
    assert uses("images", "docker/setup-qemu-action") and uses("images", "docker/setup-buildx-action")
    (build,) = uses("images", "docker/build-push-action")
    assert set(build["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["with"]["push"] is True
    assert uses("images", "sigstore/cosign-installer")
    assert 'cosign sign --yes "$IMAGE@$DIGEST"' in runs("images")
    sign = next(s for s in steps("images") if "cosign sign" in s.get("run", ""))
    assert sign["env"]["DIGEST"] == "${{ steps." + build["id"] + ".outputs.digest }}"
    assert JOBS["images"]["permissions"]["id-token"] == "write"
    assert JOBS["images"]["permissions"]["packages"] == "write"


def test_the_matrix_builds_the_operator_the_trainer_and_its_cuda12_variant() -> None:
    matrix = {entry["name"]: entry for entry in JOBS["images"]["strategy"]["matrix"]["include"]}
    assert set(matrix) == {"operator", "trainer", "trainer-cuda12.6"}
    for entry in matrix.values():
        assert (ROOT / entry["dockerfile"]).exists()
    assert matrix["operator"]["dockerfile"] == "operator/Dockerfile"
    assert matrix["trainer"]["build-args"] == "" and matrix["trainer"]["suffix"] == ""
    assert matrix["trainer-cuda12.6"]["image"] == "trainer" and matrix["trainer-cuda12.6"]["suffix"] == "-cuda12.6"


def test_the_chart_is_pushed_as_oci_signed_and_the_install_manifest_released() -> None:
    assert JOBS["chart"]["needs"] == ["version", "images"]
    script = runs("chart")
    assert "helm package charts/dpo-operator" in script
    assert 'helm push "dist/dpo-operator-$VERSION.tgz" "oci://$REGISTRY/charts"' in script
    assert uses("chart", "sigstore/cosign-installer")
    assert 'cosign sign --yes "$REGISTRY/charts/dpo-operator@$DIGEST"' in script
    assert "python -m dpo_dev.dist" in script and "--output dist/install.yaml" in script
    assert re.search(r"gh release create .* dist/install\.yaml", script)
    assert JOBS["chart"]["permissions"] == {"contents": "write", "packages": "write", "id-token": "write"}
