"""The operator and trainer images, built with podman from the repository's own Dockerfiles, without a registry.

Why: pods should run the images a cluster runs, yet no registry is reachable here. So the base image is made
with debootstrap (Debian bookworm with Python 3.11 and pip, standing in for ``python:3.11-slim`` and the CUDA
base), the trainer is its CPU variant (torch from the local CPU wheel), and each image is kept as an OCI
archive named by a hash of everything that goes into it: an unchanged tree keeps or loads the image instead
of rebuilding it. Recipe, measurements and pitfalls: docs/local-cluster.md, section "Images".

Public API:
    * :func:`ensure_images` - build (or reuse) both images; an :class:`ImageInfo` per image.
    * :func:`podman_env` - the environment every podman command needs (private containers.conf/storage.conf).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .build import DEBIAN_SUITE, Progress, StepError, _cache_lock, _quiet, _run_step, cache_dir, debian_mirror

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.1.0"
# Executables podman needs, by the Debian package that ships them (crun comes along but cannot run here).
TOOLS = {
    "podman": "podman",
    "buildah": "buildah",
    "runc": "runc",
    "fuse-overlayfs": "fuse-overlayfs",
    "debootstrap": "debootstrap",
    "newuidmap": "uidmap",
    "slirp4netns": "slirp4netns",
}
# python3-distutils by name: debootstrap does not resolve the virtual packages python3.11-venv depends on.
BASE_PACKAGES = ("python3.11", "python3.11-venv", "python3-distutils", "ca-certificates")
BASE_IMAGE = f"localhost/dpo-base:{DEBIAN_SUITE}-py311"
INPUTS_LABEL = "io.dpo-operator.inputs"
# What makes the base: a change here rebuilds it and, through their keys, both images.
BASE_KEY = hashlib.sha256(json.dumps([DEBIAN_SUITE, BASE_PACKAGES, "venv:/usr/local"]).encode()).hexdigest()
# Builds reach PyPI through a TLS-intercepting proxy: the host's bundle is mounted for the build only.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CPU_WHEELS = "/opt/wheels"  # holds torch-2.13.0+cpu; see trainer_image/Dockerfile


@dataclass(frozen=True)
class ImageSpec:
    """How one image is built: its Dockerfile plus the arguments and read-only mounts of the local variant."""

    name: str
    dockerfile: Path
    build_args: tuple[tuple[str, str], ...] = ()
    volumes: tuple[str, ...] = ()

    @property
    def tag(self) -> str:
        return f"localhost/{self.name}:{VERSION}"


IMAGES = (
    ImageSpec("dpo-operator", REPO_ROOT / "operator" / "Dockerfile"),
    ImageSpec(
        "dpo-trainer",
        REPO_ROOT / "trainer_image" / "Dockerfile",
        # The CPU variant: torch-2.13.0+cpu from the local wheels; TORCH_CUDA empty (the Dockerfile checks it).
        build_args=(("PIP_FIND_LINKS", CPU_WHEELS), ("TORCH_CUDA", "")),
        volumes=(f"{CPU_WHEELS}:{CPU_WHEELS}:ro",),
    ),
)


@dataclass(frozen=True)
class ImageInfo:
    """One image as :func:`ensure_images` left it, and what that took."""

    name: str  # localhost/<name>:0.1.0
    image_id: str
    size: int  # bytes, uncompressed (podman's SIZE)
    inputs: str  # the inputs key, also the image's io.dpo-operator.inputs label
    source: Literal["built", "loaded", "present"]
    seconds: float
    archive: Path  # the oci-archive it was saved to or loaded from


def podman_env(cache: Path | None = None) -> dict[str, str]:
    """This process's environment plus CONTAINERS_CONF/CONTAINERS_STORAGE_CONF, written under the cache (nothing
    under /etc changes): runc instead of crun (which rejects hybrid cgroups here), storage under the cache, and
    ulimits a container may set here (podman's defaults are above the hard limits, so setrlimit fails)."""
    conf = (cache or cache_dir()) / "containers"
    files = {
        "containers.conf": f'[containers]\ndefault_ulimits = ["nofile={_nofile()}", "nproc={_nproc()}"]\n\n'
        '[engine]\nruntime = "runc"\n',
        "storage.conf": f'[storage]\ndriver = "overlay"\ngraphroot = "{conf / "storage"}"\n'
        f'runroot = "{conf / "run"}"\n',
    }
    conf.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = conf / name
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return dict(
        os.environ, CONTAINERS_CONF=str(conf / "containers.conf"), CONTAINERS_STORAGE_CONF=str(conf / "storage.conf")
    )


def _nofile() -> str:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = 1048576 if hard == resource.RLIM_INFINITY else min(hard, 1048576)  # podman's own default
    return f"{limit}:{limit}"


def _nproc() -> str:
    """Measured: runc may not set RLIMIT_NPROC above kernel.pid_max either (32768 here, hard limit 96363)."""
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    limit = int(Path("/proc/sys/kernel/pid_max").read_text())
    limit = limit if hard == resource.RLIM_INFINITY else min(hard, limit)
    return f"{limit}:{limit}"


def ensure_images(
    progress: Progress = _quiet, *, no_cache: bool = False, cache: Path | None = None
) -> dict[str, ImageInfo]:
    """Both images, tagged ``localhost/<name>:0.1.0``, by name; builds only what changed since the last call.

    ``no_cache`` rebuilds both from the base, ignoring the archives and podman's layer cache.
    """
    cache = cache or cache_dir()
    with _cache_lock(cache / "images"):
        builder = _ImageBuilder(cache, progress)
        builder.tools()
        return {spec.name: builder.image(spec, no_cache) for spec in IMAGES}


class _ImageBuilder:
    def __init__(self, cache: Path, progress: Progress) -> None:
        self.dir = cache / "images"
        self.logs = cache / "logs"
        self.env = podman_env(cache)
        self._progress = progress

    def tools(self) -> None:
        """apt-get install what is missing; on failure refresh the index once (the mirror may have moved on)."""
        missing = sorted({package for exe, package in TOOLS.items() if shutil.which(exe) is None})
        if not missing:
            return
        self._progress(f"apt: installing {', '.join(missing)}")
        log = self.logs / "install-container-tools.log"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", *missing]
        try:
            _run_step("install-container-tools", install, log, env=env)
        except StepError:
            _run_step("install-container-tools", ["apt-get", "update", "-qq"], log, env=env)
            _run_step("install-container-tools", install, log, env=env)

    def inspect(self, image: str) -> dict[str, Any] | None:
        result = subprocess.run(
            ["podman", "image", "inspect", image], env=self.env, capture_output=True, text=True, check=False
        )
        return json.loads(result.stdout)[0] if result.returncode == 0 else None

    def labelled(self, image: str, key: str) -> dict[str, Any] | None:
        """The image's inspect data when it exists and was made from inputs ``key``."""
        info = self.inspect(image)
        return info if info and (info.get("Labels") or {}).get(INPUTS_LABEL) == key else None

    def podman(self, step: str, *args: str) -> None:
        _run_step(step, ["podman", *args], self.logs / f"{step}.log", env=self.env)

    def base(self) -> None:
        """The local base image (debootstrap, about a minute, once)."""
        if self.labelled(BASE_IMAGE, BASE_KEY):
            return
        step, started = "image-base", time.monotonic()
        log = self.logs / f"{step}.log"
        rootfs, tarball = self.dir / "base-rootfs", self.dir / "base-rootfs.tar"
        shutil.rmtree(rootfs, ignore_errors=True)
        self._progress(f"debootstrap {DEBIAN_SUITE} with {', '.join(BASE_PACKAGES)} (log: {log})")
        include = f"--include={','.join(BASE_PACKAGES)}"
        _run_step(step, ["debootstrap", "--variant=minbase", include, DEBIAN_SUITE, str(rootfs), debian_mirror()], log)
        # Like python:3.11-slim: python and pip on PATH, installing into /usr/local (Debian's own python3.11
        # refuses pip installs, PEP 668), so operator/Dockerfile builds unchanged.
        _run_step(step, ["chroot", str(rootfs), "python3.11", "-m", "venv", "/usr/local"], log)
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        _run_step(step, ["tar", "-C", str(rootfs), "-cf", str(tarball), "."], log)
        changes = ['CMD ["/bin/bash"]', "ENV LANG=C.UTF-8", f"LABEL {INPUTS_LABEL}={BASE_KEY}"]
        self.podman(step, "import", *(a for c in changes for a in ("--change", c)), str(tarball), BASE_IMAGE)
        shutil.rmtree(rootfs)
        tarball.unlink()
        self._progress(f"{BASE_IMAGE}: made in {time.monotonic() - started:.0f}s")

    def image(self, spec: ImageSpec, no_cache: bool) -> ImageInfo:
        """Keep, load or build one image, whichever its inputs allow."""
        started = time.monotonic()
        key = inputs_key(spec)
        archive = self.dir / f"{spec.name}-{key[:16]}.oci.tar"
        source: Literal["built", "loaded", "present"]
        if not no_cache and self.labelled(spec.tag, key):
            source = "present"
        elif not no_cache and archive.exists():
            self._progress(f"{spec.tag}: loading {archive.name}")
            self.podman(f"image-{spec.name}", "load", "--input", str(archive))
            source = "loaded"
        else:
            self.base()
            log = self.logs / f"image-{spec.name}.log"
            self._progress(f"{spec.tag}: building from {spec.dockerfile} (log: {log})")
            args = [("BASE", BASE_IMAGE), *spec.build_args]
            self.podman(
                f"image-{spec.name}",
                "build",
                "--pull=never",
                f"--file={spec.dockerfile}",
                f"--tag={spec.tag}",
                f"--label={INPUTS_LABEL}={key}",
                *(f"--build-arg={name}={value}" for name, value in args),
                *(f"--volume={v}" for v in (f"{CA_BUNDLE}:{CA_BUNDLE}:ro", *spec.volumes)),
                *(["--no-cache"] if no_cache else []),
                str(REPO_ROOT),
            )
            for old in self.dir.glob(f"{spec.name}-*"):  # older inputs, and a save cut short
                old.unlink()
            partial = archive.with_suffix(".partial")
            self.podman(f"image-{spec.name}", "save", "--format=oci-archive", f"--output={partial}", spec.tag)
            partial.rename(archive)
            source = "built"
        info = self.labelled(spec.tag, key)
        if info is None:
            raise StepError(f"image-{spec.name}", f"{spec.tag} is missing or not labelled {INPUTS_LABEL}={key}")
        seconds = time.monotonic() - started
        self._progress(f"{spec.tag}: {source} in {seconds:.0f}s, {info['Size'] / 1e6:.0f} MB")
        return ImageInfo(spec.tag, info["Id"], int(info["Size"]), key, source, seconds, archive)


def inputs_key(spec: ImageSpec) -> str:
    """sha256 over the base's key, the build arguments, the Dockerfile and every file its COPY lines send (the
    build context minus .dockerignore), path and executable bit included."""
    text = spec.dockerfile.read_text()
    digest = hashlib.sha256(json.dumps([BASE_KEY, spec.build_args, text]).encode())
    ignored = _dockerignore()
    for path in _copied_files(text, ignored):
        data = path.read_bytes()
        header = f"\0{path.relative_to(REPO_ROOT)}\0{os.access(path, os.X_OK)}\0{len(data)}\0"
        digest.update(header.encode() + data)
    return digest.hexdigest()


def _dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _copied_files(dockerfile: str, ignored: list[str]) -> list[Path]:
    """Files the COPY/ADD lines read from the context (one-line instructions, shell form)."""
    files: set[Path] = set()
    for line in re.findall(r"^\s*(?:COPY|ADD)\s+(.+)$", dockerfile, flags=re.MULTILINE | re.IGNORECASE):
        sources = [word for word in shlex.split(line) if not word.startswith("--")][:-1]
        for source in sources:
            top = REPO_ROOT / source
            candidates = [top] if top.is_file() else list(top.rglob("*"))
            files.update(p for p in candidates if p.is_file() and not _is_ignored(p, ignored))
    return sorted(files)


def _is_ignored(path: Path, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` or a folder above it out of the build context."""
    parts = path.relative_to(REPO_ROOT).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes for pattern in patterns)
