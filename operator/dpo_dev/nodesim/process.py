"""Process mode: a container as a local process, the local Python environment standing in for its image. Mount
paths in its command, args and env are rewritten to the volumes' local stand-ins; where the pod gets a
service-account token, the process sees it at the usual path in a private mount namespace."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..processes import die_with_parent
from .logs import FALLBACK_LOG_BYTES, FALLBACK_LOG_LINES, LogFile, _termination_message
from .model import SERVICE_ACCOUNT_DIR, NodeSimConfig
from .pods import _expand

if TYPE_CHECKING:
    from .runner import _Container, _PodRunner


def run_process(runner: _PodRunner, container: _Container, logfile: LogFile) -> tuple[int, str | None, str]:
    """Run the container as a local process, the local Python environment standing in for its image."""
    spec = container.spec
    termination_path = runner.dir / container.name / "termination-log"
    termination_path.write_bytes(b"")
    rewrite = _path_rewriter(spec, runner.volumes, termination_path)
    resolved = runner.sim.resolver.resolve_env(runner.pod, spec, runner.ip)
    env = runner.sim.service_env | {k: rewrite(v) for k, v in resolved.items()}  # as the kubelet orders them
    command = [rewrite(_expand(a, env)) for a in spec.get("command") or []]
    args = [rewrite(_expand(a, env)) for a in spec.get("args") or []]
    if not command:
        command = _entrypoint(spec.get("image", ""), runner.sim.config)
        if not command:
            message = f'no command and no known entrypoint for image "{spec.get("image")}"'
            logfile.write(message.encode())
            return 128, "StartError", message
    env = _base_env(runner.name, runner.sim.config) | env
    argv, pending = [*command, *args], None
    if runner.token_dir is not None:  # a missing executable would fail only at the wrapper's exec: check first
        if os.sep not in command[0] and not shutil.which(command[0], path=env["PATH"]):
            message = f"failed to start {command[0]!r}: executable file not found in $PATH"
            logfile.write(message.encode())
            return 128, "StartError", message
        pending = runner.dir / container.name / "token-mount-pending"
        pending.touch()
        argv = _with_token_mount(argv, runner.token_dir, pending)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=runner.sim.config.cwd,
            start_new_session=True,
            preexec_fn=die_with_parent,  # this thread waits for it, so the death signal is safe here
        )
    except OSError as exc:
        message = f"failed to start {argv[0]!r}: {exc}"
        message = message if pending is None else _token_mount_error(message)
        logfile.write(message.encode())
        return 128, "StartError", message
    runner.add_process(proc)
    assert proc.stdout is not None and proc.stderr is not None
    stdout, stderr = proc.stdout, proc.stderr

    def wait() -> int:
        pump = threading.Thread(target=logfile.pump, args=(stderr, "stderr"), daemon=True)
        pump.start()
        logfile.pump(stdout, "stdout")
        pump.join()
        return proc.wait()

    code = runner.supervise(container, proc, wait)
    if pending is not None and pending.exists():  # the command never ran
        message = _token_mount_error(logfile.read_tail(FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES).strip())
        logfile.write(message.encode())
        return 128, "StartError", message
    exit_code = 128 - code if code < 0 else code
    return exit_code, None, _termination_message(spec, termination_path, exit_code, logfile)


def _path_rewriter(spec: dict, volumes: dict[str, Path], termination_path: Path) -> Callable[[str], str]:
    """Map the container's absolute mount paths (and terminationMessagePath) to their local stand-ins."""
    mapping: dict[str, str] = {spec.get("terminationMessagePath") or "/dev/termination-log": str(termination_path)}
    for mount in spec.get("volumeMounts") or []:
        local = volumes.get(mount["name"])
        if local is not None:
            mapping[mount["mountPath"].rstrip("/") or "/"] = str(local / mount.get("subPath", ""))
    if not mapping:
        return lambda text: text
    prefixes = sorted(mapping, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(re.escape(p) for p in prefixes) + r")(?=/|$|[^\w.-])")
    return lambda text: pattern.sub(lambda m: mapping[m.group(1)].rstrip("/"), text)


# In the private mount namespace: a tmpfs ($1) to hold the mount point, so nothing is created on the host; the
# token dir ($3) bound read-only at $2; the marker ($4) removed once all that worked; then the command.
# -n: no entry in /run/mount/utab (that would be a write to the host).
_TOKEN_MOUNT_SCRIPT = """set -e
mount -n -t tmpfs -o mode=0755,size=1m,nosuid,nodev nodesim-secrets "$1"
mkdir -p "$2"
mount -n --bind -o ro "$3" "$2"
rm "$4"
shift 4
exec "$@"
"""


def _with_token_mount(argv: list[str], token_dir: Path, pending: Path) -> list[str]:
    """``argv`` wrapped to see ``token_dir`` at SERVICE_ACCOUNT_DIR, where in-cluster clients read it.

    The tmpfs goes over /var/run/secrets, or over /var/run when that does not exist (the process then sees an
    empty /run, as in a container). ``unshare`` execs in place: the PID and process group stay the command's.
    """
    secrets = Path(SERVICE_ACCOUNT_DIR).parents[1]
    tmpfs = secrets if secrets.is_dir() else secrets.parent
    script = ["sh", "-c", _TOKEN_MOUNT_SCRIPT, "nodesim-token-mount", str(tmpfs), SERVICE_ACCOUNT_DIR]
    return ["unshare", "--mount", "--propagation", "private", *script, str(token_dir), str(pending), *argv]


def _token_mount_error(detail: str) -> str:
    return (
        f"cannot mount the service-account token at {SERVICE_ACCOUNT_DIR}: the node simulator runs such containers "
        f"in a private mount namespace (unshare --mount, mount; needs root), which failed: {detail or 'no output'}. "
        "Run the simulator as root, or set automountServiceAccountToken: false on a pod that needs no API access"
    )


def _entrypoint(image: str, config: NodeSimConfig) -> list[str]:
    """The stand-in for an image's ENTRYPOINT: a configured mapping, else the image's name on PATH."""
    repository = image.rsplit("@", 1)[0]
    if ":" in repository.rsplit("/", 1)[-1]:
        repository = repository.rsplit(":", 1)[0]
    if repository in config.image_entrypoints:
        return list(config.image_entrypoints[repository])
    name = repository.rsplit("/", 1)[-1]
    path = os.pathsep.join([str(config.bin_dir), os.environ.get("PATH", "")])
    return [name] if name and shutil.which(name, path=path) else []


def _base_env(pod_name: str, config: NodeSimConfig) -> dict[str, str]:
    """The process env under the pod's: ours minus cluster credentials, the venv's bin first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    env["PATH"] = os.pathsep.join([str(config.bin_dir), env.get("PATH", "")])
    env["HOSTNAME"] = pod_name
    return {**env, **config.env}
