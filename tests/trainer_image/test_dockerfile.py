"""trainer_image/Dockerfile, checked statically (no Docker on the build machines): base image, user,
entrypoint, pins against pyproject.toml, no secrets, writable paths under /tmp, and agreement with the pod
the operator builds for it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from dockerfile_checks import (
    PYPROJECT,
    ROOT,
    check_pins,
    constraint_files,
    copy_sources,
    dockerignore_patterns,
    env_vars,
    hadolint,
    instructions,
    is_ignored,
    parse,
    pip_installs,
    project_installs,
    pyproject,
    read_pins,
    requirements,
    run_pins,
    secret_problems,
    unpinned,
    workspace_requirements,
)
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from dpo_operator import manifests
from dpojob_api.spec import DPOJobSpec

DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"
CONSTRAINTS = ROOT / "trainer_image" / "constraints.txt"
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
COMMANDS = parse(DOCKERFILE)
# CUDA release of PyPI's Linux torch wheel, per torch minor (its metadata requires cuda-toolkit 13.0.x).
# A torch bump fails this test until the base image is checked against the new wheel and this table updated.
TORCH_CUDA = {"2.13": "13.0"}
# Packages pinned in RUN lines that are build tooling, not dependencies of the project.
BUILD_TOOLS = {"pip"}
BASE_IMAGE = re.compile(
    r"nvidia/cuda:(?P<cuda>\d+\.\d+)\.\d+-(?:cudnn\d*-)?runtime-ubuntu(?P<ubuntu>\d+\.\d+)(?:@sha256:[0-9a-f]{64})?"
)


def operator_pod() -> tuple[dict[str, Any], dict[str, Any]]:
    """Pod spec and trainer container of the Job the operator would create for the quickstart DPOJob."""
    document = yaml.safe_load(QUICKSTART.read_text())
    document["metadata"].update(namespace="default", uid="u-1")
    pod = manifests.build_job(document, DPOJobSpec.model_validate(document["spec"]), 1)["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def build_args() -> dict[str, tuple[int, str | None]]:
    """Each ARG's position in the file and default (None without one)."""
    args = {}
    for arg in instructions(COMMANDS, "ARG"):
        name, sep, default = arg.value[0].partition("=")
        args[name] = (COMMANDS.index(arg), default if sep else None)
    return args


def test_base_is_a_pinned_cuda_runtime_matching_torch() -> None:
    froms = instructions(COMMANDS, "FROM")
    assert len(froms) == 1, "one stage expected"
    # `dpo-localcluster images` passes a local CPU base; real builds take the default.
    assert froms[0].value == ("${BASE}",)
    position, image = build_args()["BASE"]
    assert image is not None and position < COMMANDS.index(froms[0])
    match = BASE_IMAGE.fullmatch(image)
    assert match, f"{image}: expected nvidia/cuda:<major.minor.patch>-[cudnn-]runtime-ubuntu<version>"
    torch = read_pins(CONSTRAINTS)[canonicalize_name("torch")]
    assert match["cuda"] == TORCH_CUDA[f"{torch.major}.{torch.minor}"], f"torch {torch} is not built for {image}"


def test_python_matches_requires_python() -> None:
    versions = set(re.findall(r"python(3\.\d+)\b", " ".join(" ".join(c.value) for c in instructions(COMMANDS, "RUN"))))
    assert len(versions) == 1, versions
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(versions.pop() + ".0")


def test_runs_as_uid_1000_like_the_pod() -> None:
    users = instructions(COMMANDS, "USER")
    assert users and COMMANDS.index(users[-1]) > max(COMMANDS.index(c) for c in instructions(COMMANDS, "RUN"))
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and uid != "0", "USER must be numeric (runAsNonRoot can only verify numeric users)"
    pod, _ = operator_pod()
    assert int(uid) == pod["securityContext"]["runAsUser"]


def test_entrypoint_is_the_cli_and_the_default_runs_the_quickstart() -> None:
    (entrypoint,) = instructions(COMMANDS, "ENTRYPOINT")
    (cmd,) = instructions(COMMANDS, "CMD")
    assert entrypoint.json and list(entrypoint.value) == ["dpo-trainer"]
    assert list(entrypoint.value) == operator_pod()[1]["command"]
    assert cmd.json and list(cmd.value) == ["run", "examples/quickstart.yaml"]
    assert pyproject("trainer_image")["project"]["scripts"] == {"dpo-trainer": "dpo_trainer.cli:main"}


def test_quickstart_assets_are_in_the_working_directory() -> None:
    workdir = instructions(COMMANDS, "WORKDIR")[-1].value[0]
    assert workdir == "/app"
    assert any(c.value == ("examples", "examples") for c in instructions(COMMANDS, "COPY"))
    spec = yaml.safe_load(QUICKSTART.read_text())["spec"]
    assert spec["model"]["name"].startswith("./examples/")
    # The root filesystem is read-only in the pod: everything the quickstart writes is under /tmp.
    assert spec["output"]["directory"].startswith("/tmp/")
    assert spec["checkpointing"]["directory"].startswith("/tmp/")


def test_pins_are_exactly_the_trainer_extra_within_pyproject_ranges() -> None:
    installs = pip_installs(COMMANDS)
    assert project_installs(installs) == {"trainer_image"}
    assert not unpinned(installs)
    assert constraint_files(installs) == {"trainer_image/constraints.txt"}
    required = requirements("trainer_image")
    pins = read_pins(CONSTRAINTS)
    assert not check_pins(pins, required)
    assert set(pins) == set(required), "constraints.txt pins exactly trainer_image/pyproject.toml's dependencies"
    assert required == workspace_requirements("trainer"), "the image's ranges are the development install's"
    for name, version in run_pins(COMMANDS).items():
        assert name in BUILD_TOOLS or not check_pins({name: version}, required), f"{name}=={version}"
    for args in installs:
        assert not {"--index-url", "-i", "--extra-index-url", "--pre"} & set(args), args


@pytest.mark.parametrize(
    ("pins", "problem"),
    [
        ({"torch": "2.14.1"}, "outside pyproject's range"),
        ({}, "not pinned"),
    ],
)
def test_pin_check_catches_drift(pins: dict[str, str], problem: str) -> None:
    """The checker itself: a pin outside the range and a missing pin are both reported."""
    required = {canonicalize_name("torch"): requirements("trainer_image")[canonicalize_name("torch")]}
    found = check_pins({canonicalize_name(k): Version(v) for k, v in pins.items()}, required)
    assert len(found) == 1 and problem in found[0]


def test_no_secrets_in_the_image() -> None:
    assert not secret_problems(DOCKERFILE, COMMANDS)
    # Build args end up in the image history: only the base, torch's CUDA build (the CPU variant's wheel directory,
    # the CUDA 12 variant's extra index, both unset by default so pip takes PyPI's CUDA torch) and what it needs.
    args = build_args()
    assert set(args) == {"BASE", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "TORCH_CUDA", "DPO_MIN_DRIVER"}
    assert args["PIP_FIND_LINKS"][1] is None and args["PIP_EXTRA_INDEX_URL"][1] is None
    assert not any("HF_TOKEN" in c.original for c in COMMANDS)


def test_caches_and_hf_home_are_under_tmp_like_the_pod() -> None:
    env = env_vars(COMMANDS)
    for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TRITON_CACHE_DIR"):
        assert env.get(name, "").startswith("/tmp/") or env.get(name) == "/tmp", name
    _, container = operator_pod()
    assert env["HF_HOME"] == {e["name"]: e.get("value") for e in container["env"]}["HF_HOME"]
    assert container["securityContext"]["readOnlyRootFilesystem"]
    assert {"mountPath": "/tmp", "name": "tmp"} in container["volumeMounts"]


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = dockerignore_patterns()
    assert str(CONSTRAINTS.relative_to(ROOT)) in copy_sources(COMMANDS)
    for source in copy_sources(COMMANDS):
        assert (ROOT / source).exists(), source
        assert not is_ignored(source, patterns), f"{source} is excluded by .dockerignore"
    for kept_out in (".venv", ".git", "tests", ".pytest_cache", ".ruff_cache", "operator/dpo_operator/__pycache__"):
        assert is_ignored(kept_out, patterns), kept_out


def test_hadolint_is_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_carries_the_shared_api_and_the_trainer_only() -> None:
    sources = [s for s in copy_sources(COMMANDS) if s.startswith(("operator", "trainer_image/dpo"))]
    assert sorted(sources) == ["operator/dpojob_api", "trainer_image/dpo_trainer"]


def release_variants() -> dict[str, dict[str, str]]:
    """The trainer variants the release workflow builds: matrix name -> build arguments (plus the tag suffix)."""
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "release.yml").read_text())
    variants = {}
    for entry in workflow["jobs"]["images"]["strategy"]["matrix"]["include"]:
        if entry["dockerfile"] == str(DOCKERFILE.relative_to(ROOT)):
            lines = entry["build-args"].splitlines()
            variants[entry["name"]] = {**dict(line.split("=", 1) for line in lines), "suffix": entry["suffix"]}
    return variants


def test_default_variant_records_the_driver_its_torch_needs() -> None:
    """The defaults are the CUDA 13 image: TORCH_CUDA is PyPI's torch build, DPO_MIN_DRIVER the trainer's table."""
    from dpo_trainer.models import DRIVER_FOR_CUDA, IMAGE_CUDA

    args = build_args()
    torch = read_pins(CONSTRAINTS)[canonicalize_name("torch")]
    assert args["TORCH_CUDA"][1] == TORCH_CUDA[f"{torch.major}.{torch.minor}"] == IMAGE_CUDA
    assert args["DPO_MIN_DRIVER"][1] == str(DRIVER_FOR_CUDA[int(IMAGE_CUDA.split(".")[0])])
    assert args["TORCH_CUDA"][0] > COMMANDS.index(instructions(COMMANDS, "FROM")[0]), "ARGs after FROM reach RUN"
    env = env_vars(COMMANDS)
    assert env["DPO_TORCH_CUDA"] == "${TORCH_CUDA}" and env["DPO_MIN_DRIVER"] == "${DPO_MIN_DRIVER}"
    (label,) = instructions(COMMANDS, "LABEL")
    assert dict(zip(label.value[::2], label.value[1::2], strict=True)) == {
        "io.dpo-operator.torch-cuda": '"${TORCH_CUDA}"',
        "io.dpo-operator.min-nvidia-driver": '"${DPO_MIN_DRIVER}"',
    }
    # The build fails when pip resolved another CUDA build of torch than TORCH_CUDA (e.g. PyPI's over the index).
    runs = [c.original for c in instructions(COMMANDS, "RUN")]
    assert any("torch/version.py" in run and "${TORCH_CUDA}" in run for run in runs)


def test_cuda12_variant_arguments_agree_with_each_other_and_the_trainer() -> None:
    """The release's CUDA 12 trainer: a CUDA 12.x runtime base, torch's +cu12x build from PyTorch's index for
    the same CUDA release, tagged -cuda12.x, needing the driver dpo_trainer.models names for CUDA 12."""
    from dpo_trainer.models import DRIVER_FOR_CUDA

    variants = release_variants()
    assert variants["trainer"] == {"suffix": ""}, "the default trainer is the Dockerfile's defaults"
    (cuda12,) = [v for name, v in variants.items() if name != "trainer"]
    assert set(cuda12) - {"suffix"} <= set(build_args()), "every build argument is an ARG of the Dockerfile"
    cuda = cuda12["TORCH_CUDA"]
    assert cuda.startswith("12.") and cuda12["suffix"] == f"-cuda{cuda}"
    match, default = BASE_IMAGE.fullmatch(cuda12["BASE"]), BASE_IMAGE.fullmatch(build_args()["BASE"][1] or "")
    assert match and default and match["cuda"] == cuda and match["ubuntu"] == default["ubuntu"]
    assert cuda12["PIP_EXTRA_INDEX_URL"] == "https://download.pytorch.org/whl/cu" + cuda.replace(".", "")
    assert cuda12["DPO_MIN_DRIVER"] == str(DRIVER_FOR_CUDA[12])
