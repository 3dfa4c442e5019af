"""operator/Dockerfile, checked statically (no Docker on the build machines): non-root, the dpo-operator
entrypoint, and only the `operator` extra installed, pinned within pyproject.toml's ranges (no ML stack)."""

from __future__ import annotations

import re

from dockerfile_checks import (
    PYPROJECT,
    ROOT,
    check_pins,
    constraint_files,
    copy_sources,
    dockerignore_patterns,
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

from dpo_operator.settings import OperatorSettings

DOCKERFILE = ROOT / "operator" / "Dockerfile"
CONSTRAINTS = ROOT / "operator" / "constraints.txt"
COMMANDS = parse(DOCKERFILE)


def default_base() -> str:
    """The image `FROM ${BASE}` uses unless a build passes BASE (`dpo-localcluster images` passes a local one)."""
    (base,) = instructions(COMMANDS, "FROM")
    (arg,) = instructions(COMMANDS, "ARG")
    assert base.value == ("${BASE}",) and COMMANDS.index(arg) < COMMANDS.index(base)
    name, _, default = arg.value[0].partition("=")
    assert name == "BASE"
    return default


def test_base_is_a_pinned_python_matching_requires_python() -> None:
    base = default_base()
    match = re.fullmatch(r"python:(3\.\d+)-slim-\w+(?:@sha256:[0-9a-f]{64})?", base)
    assert match, f"{base}: expected python:<3.x>-slim-<debian release>"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(match.group(1) + ".0")


def test_runs_as_a_numeric_non_root_user() -> None:
    users = instructions(COMMANDS, "USER")
    assert users and COMMANDS.index(users[-1]) > max(COMMANDS.index(c) for c in instructions(COMMANDS, "RUN"))
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and uid != "0"


def test_entrypoint_is_the_operator_serving_on_its_default_port() -> None:
    (entrypoint,) = instructions(COMMANDS, "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("dpo-operator",), "settings come from env, not arguments"
    assert pyproject("operator")["project"]["scripts"] == {"dpo-operator": "dpo_operator.main:cli"}, "no other script"
    default_port = OperatorSettings.model_fields["port"].default
    assert instructions(COMMANDS, "EXPOSE")[0].value == (str(default_port),)


def test_installs_only_the_operator_project_pinned_within_its_ranges() -> None:
    installs = pip_installs(COMMANDS)
    assert project_installs(installs) == {"operator"}
    assert not unpinned(installs)
    assert constraint_files(installs) == {"operator/constraints.txt"}
    required = requirements("operator")
    pins = read_pins(CONSTRAINTS)
    assert not check_pins(pins, required)
    assert set(pins) == set(required), "constraints.txt pins exactly operator/pyproject.toml's dependencies"
    assert not run_pins(COMMANDS)


def test_the_image_project_has_the_development_installs_ranges_and_only_its_packages() -> None:
    """operator/pyproject.toml (the image) and the top-level pyproject.toml (the development install) agree."""
    assert requirements("operator") == workspace_requirements("operator")
    assert pyproject("operator")["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "dpojob_api*",
        "dpo_operator*",
    ]


def test_no_ml_stack_in_the_image() -> None:
    trainer_only = set(requirements("trainer_image")) - set(requirements("operator"))
    text = DOCKERFILE.read_text().lower() + CONSTRAINTS.read_text().lower()
    assert not [name for name in trainer_only if re.search(rf"\b{re.escape(name)}\b", text)]
    # The shared API and the operator; no trainer code, no development tools.
    sources = [s for s in copy_sources(COMMANDS) if s.startswith(("operator/dpo", "trainer_image"))]
    assert sources == ["operator/dpojob_api", "operator/dpo_operator"]


def test_no_secrets_and_a_clean_build_context() -> None:
    assert not secret_problems(DOCKERFILE, COMMANDS)
    (arg,) = instructions(COMMANDS, "ARG")  # BASE only, declared before FROM: no build arg reaches the image
    assert COMMANDS.index(arg) < COMMANDS.index(instructions(COMMANDS, "FROM")[0])
    patterns = dockerignore_patterns()
    for source in copy_sources(COMMANDS):
        assert (ROOT / source).exists(), source
        assert not is_ignored(source, patterns), f"{source} is excluded by .dockerignore"


def test_hadolint_is_clean() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr
