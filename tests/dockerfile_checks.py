"""Static checks shared by the Dockerfile tests: Docker cannot run on the build machines, so the images are
kept right by parsing their Dockerfiles (BuildKit's own parser, via the `dockerfile` package), by hadolint,
and by comparing their pinned Python packages with pyproject.toml."""

from __future__ import annotations

import fnmatch
import itertools
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import dockerfile
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
HADOLINT = Path(sys.executable).with_name("hadolint")  # installed into the venv by the `dev` extra
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|API_?KEY|PRIVATE_?KEY", re.IGNORECASE)
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")
PIN = re.compile(r"(?<![\w.-])([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)")


def parse(path: Path) -> tuple[dockerfile.Command, ...]:
    return dockerfile.parse_file(str(path))


def instructions(commands: tuple[dockerfile.Command, ...], name: str) -> list[dockerfile.Command]:
    return [c for c in commands if c.cmd == name]


def env_vars(commands: tuple[dockerfile.Command, ...]) -> dict[str, str]:
    """The image's environment from every ENV instruction; later ones win, as in the image."""
    result: dict[str, str] = {}
    for command in commands:
        if command.cmd == "ENV":
            result.update(zip(command.value[::2], command.value[1::2], strict=True))
    return result


def pyproject(image_dir: str) -> dict[str, Any]:
    """The pyproject.toml an image installs (operator/ or trainer_image/)."""
    return tomllib.loads((ROOT / image_dir / "pyproject.toml").read_text())


def requirements(image_dir: str) -> dict[NormalizedName, Requirement]:
    """The dependencies of the project an image installs, by normalized name."""
    parsed = (Requirement(line) for line in pyproject(image_dir)["project"]["dependencies"])
    return {canonicalize_name(r.name): r for r in parsed}


def workspace_requirements(extra: str) -> dict[NormalizedName, Requirement]:
    """The top-level (development) pyproject's base dependencies plus one extra, by normalized name."""
    project = PYPROJECT["project"]
    parsed = (Requirement(line) for line in [*project["dependencies"], *project["optional-dependencies"][extra]])
    return {canonicalize_name(r.name): r for r in parsed}


def read_pins(path: Path) -> dict[NormalizedName, Version]:
    """A constraints file: one `name==version` per line, comments allowed, nothing looser."""
    pins: dict[NormalizedName, Version] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{path.name}: {line!r} is not an exact pin"
        name = canonicalize_name(requirement.name)
        assert name not in pins, f"{path.name}: {name} is pinned twice"
        pins[name] = Version(specifiers[0].version)
    return pins


def run_pins(commands: tuple[dockerfile.Command, ...]) -> dict[NormalizedName, Version]:
    """`name==version` pins written directly in RUN lines (e.g. the pip version)."""
    return {
        canonicalize_name(name): Version(version)
        for command in instructions(commands, "RUN")
        for name, version in PIN.findall(" ".join(command.value))
    }


def pip_installs(commands: tuple[dockerfile.Command, ...]) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN lines (shell `&&` chains split)."""
    installs = []
    for command in instructions(commands, "RUN"):
        for part in re.split(r"&&|;|\|\|", " ".join(command.value)):
            words = shlex.split(part)
            if len(words) >= 2 and Path(words[0]).name.startswith("pip") and words[1] == "install":
                installs.append(words[2:])
    return installs


def project_installs(installs: list[list[str]]) -> set[str]:
    """Local projects pip installs (`./operator`), by their directory."""
    return {arg[2:] for args in installs for arg in args if re.fullmatch(r"\./[\w-]+", arg)}


def constraint_files(installs: list[list[str]]) -> set[str]:
    """Files passed to pip with -r/-c (the pins the image installs from)."""
    files = set()
    for args in installs:
        for flag, value in itertools.pairwise(args):
            if flag in ("-r", "-c", "--requirement", "--constraint"):
                files.add(value)
    return files


def unpinned(installs: list[list[str]]) -> list[str]:
    """Requirements named on a pip command line without `==` (a local project, `./operator`, excepted)."""
    loose = []
    for args in installs:
        takes_value = False
        for arg in args:
            if takes_value:
                takes_value = False
            elif arg.startswith("-"):
                takes_value = arg in ("-r", "-c", "--requirement", "--constraint", "-i", "--index-url")
            elif not re.fullmatch(r"\./[\w-]+", arg) and not PIN.fullmatch(arg):
                loose.append(arg)
    return loose


def check_pins(pins: dict[NormalizedName, Version], required: dict[NormalizedName, Requirement]) -> list[str]:
    """Problems: a pyproject dependency left unpinned, or a pin outside pyproject's range."""
    problems = [f"{name} is a dependency in pyproject.toml but not pinned" for name in required if name not in pins]
    for name, version in pins.items():
        if name in required and not SpecifierSet(str(required[name].specifier)).contains(version, prereleases=True):
            problems.append(f"{name}=={version} is outside pyproject's range {required[name].specifier}")
    return problems


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) or a folder above it out of the build."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)


def copy_sources(commands: tuple[dockerfile.Command, ...]) -> list[str]:
    """Build-context paths that COPY/ADD read (the last value is the destination)."""
    return [src for c in commands if c.cmd in ("COPY", "ADD") for src in c.value[:-1]]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def secret_problems(path: Path, commands: tuple[dockerfile.Command, ...]) -> list[str]:
    """ARG/ENV names that look like credentials, and token-shaped strings anywhere in the file."""
    problems = []
    for command in commands:
        names = command.value[::2] if command.cmd == "ENV" else command.value if command.cmd == "ARG" else ()
        problems += [f"{command.cmd} {name}" for name in names if SECRET_NAME.search(name.split("=", 1)[0])]
    problems += [f"token-shaped string {m}" for m in HF_TOKEN_SHAPE.findall(path.read_text())]
    return problems
