"""The real images, built with podman from the repository's Dockerfiles (dpo_dev.images), run the way
the pod runs them: read-only root, uid 1000, no capabilities, no new privileges, no network."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dpo_dev import images
from dpo_dev.images import ImageInfo, ImageSpec, ensure_images, inputs_key, podman_env

# A cold build (base, both images, the trainer's ML stack from PyPI) takes about three minutes; later calls
# find the images in place.
pytestmark = pytest.mark.timeout(1200)

RESTRICTED = [
    "--rm",
    "--read-only",
    "--user=1000:1000",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges",
    "--network=none",
]


@pytest.fixture(scope="module")
def built() -> dict[str, ImageInfo]:
    return ensure_images()


def podman_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "run", *RESTRICTED, *args],
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_trainer_image_runs_the_bundled_quickstart_with_no_arguments(built: dict[str, ImageInfo]) -> None:
    result = podman_run(built["dpo-trainer"].name)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    done = json.loads(result.stdout.strip().splitlines()[-1])  # the operator's progress protocol, on stdout
    assert done["event"] == "done" and done["summary"]["metrics"]["rewards/accuracies"] > 0.5
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith("dpo-trainer: done") and "rewards/margins=" in summary, summary


def test_trainer_container_is_unprivileged_and_its_root_filesystem_read_only(built: dict[str, ImageInfo]) -> None:
    probe = """
import errno, json, os, pathlib
status = dict(line.split(":\\t", 1) for line in pathlib.Path("/proc/self/status").read_text().splitlines())
writes = {}
for path in ("/app/probe", "/opt/venv/probe", "/tmp/probe"):
    try:
        pathlib.Path(path).write_text("x")
        writes[path] = "ok"
    except OSError as exc:
        writes[path] = errno.errorcode[exc.errno]
print(json.dumps({"uid": os.getuid(), "cap_eff": status["CapEff"].strip(),
                  "no_new_privs": status["NoNewPrivs"].strip(), "writes": writes}))
"""
    result = podman_run("--entrypoint=python", built["dpo-trainer"].name, "-c", probe)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["uid"] == 1000
    assert int(seen["cap_eff"], 16) == 0 and seen["no_new_privs"] == "1"
    assert seen["writes"] == {"/app/probe": "EROFS", "/opt/venv/probe": "EROFS", "/tmp/probe": "ok"}


def test_operator_image_starts_as_uid_1000(built: dict[str, ImageInfo]) -> None:
    help_text = podman_run(built["dpo-operator"].name, "--help")
    assert help_text.returncode == 0 and help_text.stdout.startswith("usage: dpo-operator"), help_text.stderr
    # Pod specs name the images without a registry; podman finds them under localhost/.
    probe = "import os, dpo_operator.main; print(os.getuid())"
    imported = podman_run("--entrypoint=python", "dpo-operator:0.1.0", "-c", probe)
    assert imported.returncode == 0 and imported.stdout.strip() == "1000", imported.stderr


def test_each_image_carries_the_shared_api_and_its_own_package_and_script_only(built: dict[str, ImageInfo]) -> None:
    probe = (
        "import importlib.util, json, shutil; "
        "print(json.dumps({**{m: importlib.util.find_spec(m) is not None "
        "for m in ('dpojob_api', 'dpo_operator', 'dpo_trainer', 'dpo_dev')}, "
        "**{s: shutil.which(s) is not None for s in ('dpo-operator', 'dpo-trainer', 'dpo-localcluster')}}))"
    )
    expected = {
        "dpo-operator": {"dpojob_api", "dpo_operator", "dpo-operator"},
        "dpo-trainer": {"dpojob_api", "dpo_trainer", "dpo-trainer"},
    }
    for image, present in expected.items():
        result = podman_run("--entrypoint=python", built[image].name, "-c", probe)
        assert result.returncode == 0, result.stderr
        assert {name for name, found in json.loads(result.stdout).items() if found} == present, image


def test_an_unchanged_tree_rebuilds_nothing_and_a_removed_image_is_loaded_back() -> None:
    first = ensure_images()  # not the fixture's: the tree may have changed since it ran
    again = ensure_images()
    assert {name: info.source for name, info in again.items()} == {"dpo-operator": "present", "dpo-trainer": "present"}
    assert {name: info.image_id for name, info in again.items()} == {n: i.image_id for n, i in first.items()}
    operator = again["dpo-operator"]
    subprocess.run(["podman", "rmi", operator.name], env=podman_env(), capture_output=True, check=True)
    reloaded = ensure_images()["dpo-operator"]
    assert reloaded.source == "loaded" and reloaded.image_id == operator.image_id


def test_inputs_key_follows_what_the_dockerfile_copies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key changes with a copied file's content or mode and stays put for what the build never sees."""
    monkeypatch.setattr(images, "REPO_ROOT", tmp_path)
    (tmp_path / ".dockerignore").write_text("# comment\n**/__pycache__\ndocs\n")
    (tmp_path / "Dockerfile").write_text("ARG BASE\nFROM ${BASE}\nCOPY pkg ./pkg\nCOPY --chown=1000 a.txt /a.txt\n")
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "a.txt").write_text("a\n")
    spec = ImageSpec("probe", tmp_path / "Dockerfile")
    key = inputs_key(spec)

    (tmp_path / "pkg" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "docs" / "notes.md").write_text("not copied\n")
    (tmp_path / "unrelated.txt").write_text("not copied\n")
    assert inputs_key(spec) == key

    (tmp_path / "pkg" / "mod.py").chmod(0o755)
    assert inputs_key(spec) != key
    (tmp_path / "pkg" / "mod.py").chmod(0o644)
    assert inputs_key(spec) == key
    (tmp_path / "a.txt").write_text("b\n")
    assert inputs_key(spec) != key
    assert inputs_key(ImageSpec("probe", tmp_path / "Dockerfile", build_args=(("X", "1"),))) != inputs_key(spec)
