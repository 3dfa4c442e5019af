"""Container mode: podman runs the pod's image with the pod spec applied as a kubelet applies it through its
container runtime (command/args, env, volumes as mounts, user and groups, read-only root, no new privileges,
capabilities, memory/CPU limits with OOM kills, termination message), on the host network so the pod IP, probes
and 127.0.0.1 services work as in process mode. Nothing is pulled: images come from local storage."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes.utils import parse_quantity

from ..processes import die_with_parent
from .logs import LogFile, _termination_message
from .model import ANNOTATION_PREFIX, SERVICE_ACCOUNT_DIR, ContainerConfigError, _now, _parse_time
from .pods import _expand

if TYPE_CHECKING:
    from .runner import _Container, _PodRunner

SIMULATOR_LABEL = f"{ANNOTATION_PREFIX}simulator"  # on every podman container: the simulator that started it


def run_container(runner: _PodRunner, container: _Container, logfile: LogFile) -> tuple[int, str | None, str]:
    """Run the container with podman from its image, as a kubelet does through its container runtime."""
    spec, sim = container.spec, runner.sim
    image = sim.local_image(spec.get("image", ""))
    if image is None:  # removed from storage since the pull check
        message = f'image "{spec.get("image")}" is not in local storage'
        logfile.write(message.encode())
        return 128, "StartError", message
    # podman's working directory is conmon's, and conmon 2.1 leaves its OOM marker there (see _oom_killed).
    attempt = runner.dir / container.name / f"attempt-{container.restart_count}"
    attempt.mkdir(parents=True, exist_ok=True)
    termination = attempt / "termination-log"
    termination.touch()
    termination.chmod(0o666)  # the kubelet's mode: any container user may write its message
    env = sim.service_env | sim.resolver.resolve_env(runner.pod, spec, runner.ip)  # as the kubelet orders them
    run = ContainerRun(
        name=_container_name(runner.pod, container.name, container.restart_count),
        image=image[0],
        image_user=image[1].get("User") or "",
        command=[_expand(a, env) for a in spec.get("command") or []],
        args=[_expand(a, env) for a in spec.get("args") or []],
        env_file=attempt / "env",
        volumes=runner.volumes,
        termination=termination,
        token_dir=runner.token_dir,
        log=logfile.path,
        labels={
            SIMULATOR_LABEL: sim.id,
            "io.kubernetes.pod.namespace": runner.namespace,
            "io.kubernetes.pod.name": runner.name,
            "io.kubernetes.pod.uid": runner.uid,
            "io.kubernetes.container.name": container.name,
        },
        passed_env=tuple(name for name, value in env.items() if "\n" in value),
    )
    argv = podman_run_args(runner.pod, spec, run)  # raises ContainerConfigError (runAsNonRoot)
    _write_env_file(run.env_file, env)  # values never go on a command line, which every process can read
    sim.containers_started.add(run.name)
    try:
        result = sim.podman("run", "--detach", *argv, cwd=attempt, env={k: env[k] for k in run.passed_env})
    finally:
        run.env_file.unlink()
    if result.returncode != 0:
        sim.remove_containers([run.name])
        message = result.stderr.strip().removeprefix("Error: ") or f"podman run exited {result.returncode}"
        logfile.write(message.encode() + b"\n")
        return 128, "StartError", message
    state = sim.container_state(run.name)
    container.container_id = f"podman://{result.stdout.strip()}"
    container.image_id = f"{image[0]}@{image[1]['Digest']}"
    runner.show_running(container, logfile, _rfc3339(state.get("StartedAt", "")))
    proc = _PodmanWait(run.name, sim.podman_env())
    runner.add_process(proc)
    runner.supervise(container, proc, proc.wait)
    state = sim.container_state(run.name)
    sim.remove_containers([run.name])
    exit_code = int(state.get("ExitCode", 137))
    reason = "OOMKilled" if _oom_killed(state, attempt) else None
    return exit_code, reason, _termination_message(spec, termination, exit_code, logfile)


class _PodmanWait(subprocess.Popen):
    """`podman wait` on one container: it ends when the container does; signals go to ``container`` by podman."""

    def __init__(self, container: str, env: dict[str, str]) -> None:
        super().__init__(
            ["podman", "wait", container],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=die_with_parent,  # the runner thread that starts it waits for it
        )
        self.container = container


@dataclass(frozen=True)
class ContainerRun:
    """One container attempt as podman is to run it, with the host side of every path (podman_run_args)."""

    name: str
    image: str  # a reference in local storage, e.g. localhost/dpo-trainer:0.1.0
    image_user: str  # the image's USER ("" = root), for runAsNonRoot
    command: list[str]  # $(VAR)-expanded; empty: the image's ENTRYPOINT (and its CMD unless args are given)
    args: list[str]
    env_file: Path
    volumes: dict[str, Path]  # pod volume name -> its host stand-in (materialize_volumes)
    termination: Path
    token_dir: Path | None
    log: Path
    labels: dict[str, str] = field(default_factory=dict)
    passed_env: tuple[str, ...] = ()  # names whose values podman takes from its own environment (multi-line)


def local_image_refs(image: str) -> list[str]:
    """Where a pod's image may be in local storage: a name without a registry (``dpo-trainer:0.1.0``) under
    ``localhost/`` first, where `dpo-localcluster images` tags the project's images, then as written."""
    first = image.split("/", 1)[0]
    qualified = "/" in image and ("." in first or ":" in first or first == "localhost")
    return [image] if qualified else [f"localhost/{image}", image]


def podman_run_args(pod: dict, spec: dict, run: ContainerRun) -> list[str]:
    """The arguments of `podman run` (after ``run``) that give the container what a kubelet gives it."""
    pod_spec = pod["spec"]
    args = [
        f"--name={run.name}",
        "--pull=never",  # nothing is pulled: images come from `dpo-localcluster images` or `podman load`
        "--network=host",  # pod IPs (127.77.x.y), the API server and a local Hub are all host addresses
        "--log-driver=k8s-file",  # conmon writes the CRI log format the kubelet endpoint serves
        f"--log-opt=path={run.log}",
        f"--env-file={run.env_file}",
        *(f"--env={name}" for name in run.passed_env),
        "--pids-limit=-1",  # the kubelet sets no per-container limit (podman's default is 2048)
        *(f"--label={key}={value}" for key, value in run.labels.items()),
    ]
    if pod_spec.get("hostNetwork"):
        args.append("--uts=host")
    else:
        args.append(f"--hostname={pod_spec.get('hostname') or pod['metadata']['name']}")
    if spec.get("workingDir"):
        args.append(f"--workdir={spec['workingDir']}")
    args += _security_args(pod_spec, spec, run.image_user)
    args += _resource_args(spec)
    args += _mount_args(pod_spec, spec, run)
    if run.command:
        args.append(f"--entrypoint={json.dumps(run.command)}")  # as in Kubernetes, the image's CMD is dropped
    return [*args, run.image, *run.args]


def _security_args(pod_spec: dict, spec: dict, image_user: str) -> list[str]:
    """securityContext as podman flags: the container's fields over the pod's, fsGroup and supplementalGroups
    as extra groups, runAsNonRoot verified as the kubelet does (ContainerConfigError when it fails)."""
    context = {**(pod_spec.get("securityContext") or {}), **(spec.get("securityContext") or {})}
    user, group = context.get("runAsUser"), context.get("runAsGroup")
    if context.get("runAsNonRoot"):
        image_uid = image_user.split(":")[0]
        if user is not None and int(user) == 0:
            raise ContainerConfigError("container's runAsUser breaks non-root policy")
        if user is None and image_uid and not image_uid.isdigit():
            message = f"container has runAsNonRoot and image has non-numeric user ({image_uid}), cannot verify user"
            raise ContainerConfigError(message + " is non-root")
        if user is None and int(image_uid or 0) == 0:
            raise ContainerConfigError("container has runAsNonRoot and image will run as root")
    args = []
    if user is not None:
        args.append(f"--user={user}" + (f":{group}" if group is not None else ""))
    elif group is not None:
        args.append(f"--user={image_user.split(':')[0] or 0}:{group}")
    groups = ([context["fsGroup"]] if context.get("fsGroup") is not None else []) + list(
        context.get("supplementalGroups") or []
    )
    args += [f"--group-add={g}" for g in groups]
    if context.get("privileged"):
        args.append("--privileged")
    if context.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # podman would add tmpfs on /tmp, /run: Kubernetes doesn't
    if context.get("allowPrivilegeEscalation") is False:
        args.append("--security-opt=no-new-privileges")
    capabilities = context.get("capabilities") or {}
    args += [f"--cap-drop={c}" for c in capabilities.get("drop") or []]
    args += [f"--cap-add={c}" for c in capabilities.get("add") or []]
    seccomp = (context.get("seccompProfile") or {}).get("type", "Unconfined")  # 1.20's default: unconfined
    if seccomp == "Localhost":
        raise ContainerConfigError("the node simulator has no Localhost seccomp profiles")
    if seccomp == "Unconfined":
        args.append("--security-opt=seccomp=unconfined")
    return args


def _resource_args(spec: dict) -> list[str]:
    """limits.memory (no swap, as on a node), limits.cpu as a CFS quota (at most this machine's CPUs: the
    fake node may have more), the CPU request as shares."""
    resources = spec.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    args = []
    if "memory" in limits:
        memory = int(parse_quantity(limits["memory"]))
        args += [f"--memory={memory}", f"--memory-swap={memory}"]
    if "cpu" in limits:
        args.append(f"--cpus={min(float(parse_quantity(limits['cpu'])), float(os.cpu_count() or 1)):g}")
    cpu = requests.get("cpu", limits.get("cpu"))
    if cpu is not None:
        args.append(f"--cpu-shares={max(2, int(parse_quantity(cpu) * 1024))}")
    return args


def _mount_args(pod_spec: dict, spec: dict, run: ContainerRun) -> list[str]:
    """volumeMounts as bind mounts of their host stand-ins (configMap and secret read-only, as the kubelet
    mounts them; subPath as a path below), memory-backed emptyDirs as a tmpfs of the container, the
    termination-message file, and the service-account token dir unless a mount already covers its path."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    args, targets = [], set()
    for mount in spec.get("volumeMounts") or []:
        volume, target = volumes.get(mount["name"], {}), mount["mountPath"]
        targets.add(target.rstrip("/"))
        empty_dir = volume.get("emptyDir") or {}
        if empty_dir.get("medium") == "Memory":
            size = f",size={int(parse_quantity(empty_dir['sizeLimit']))}" if empty_dir.get("sizeLimit") else ""
            args.append(f"--tmpfs={target}:rw,nosuid,nodev,mode=1777{size}")
            continue
        source = run.volumes[mount["name"]] / mount.get("subPath", "")
        if not source.exists():  # the kubelet creates a missing subPath
            source.mkdir(parents=True)
        read_only = mount.get("readOnly") or "configMap" in volume or "secret" in volume
        args.append(f"--mount=type=bind,source={source},destination={target}" + (",ro" if read_only else ""))
    termination_path = spec.get("terminationMessagePath") or "/dev/termination-log"
    args.append(f"--mount=type=bind,source={run.termination},destination={termination_path}")
    if run.token_dir is not None and SERVICE_ACCOUNT_DIR not in targets:
        args.append(f"--mount=type=bind,source={run.token_dir},destination={SERVICE_ACCOUNT_DIR},ro")
    return args


def _container_name(pod: dict, container: str, attempt: int) -> str:
    """dockershim's naming, k8s_<container>_<pod>_<namespace>_<pod uid>_<attempt>: deterministic and unique."""
    meta = pod["metadata"]
    return f"k8s_{container}_{meta['name']}_{meta['namespace']}_{meta['uid']}_{attempt}"


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    """The values podman's --env-file can carry (one line each, taken as is: no quoting), readable by root only;
    values with a newline go by name (ContainerRun.passed_env)."""
    path.touch(mode=0o600)
    path.write_text("".join(f"{name}={value}\n" for name, value in env.items() if "\n" not in value))


def _oom_killed(state: dict, attempt_dir: Path) -> bool:
    """Whether the kernel's OOM killer ended the container inside its memory limit. podman >= 5 says so in
    State.OOMKilled; podman 4.3 with conmon 2.1 on cgroup v1 never does: conmon gets the OOM event (an eventfd
    on the cgroup's memory.oom_control) and creates its "oom" marker in its working directory, which is the
    working directory of the podman that started it, while podman 4.3 looks for it in the container's bundle
    directory (containers/conmon#504; podman#21523, in 5.0, moved both to the persist dir). The runner starts
    podman in a directory of the attempt's own, so the marker found there is that attempt's."""
    return bool(state.get("OOMKilled")) or (attempt_dir / "oom").exists()


def _rfc3339(value: str) -> str:
    """podman's timestamps (nanoseconds, any zone) as the whole-second UTC times of pod status."""
    try:
        return _parse_time(value).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return _now()


def check_podman(env: dict[str, str]) -> None:
    """Raise RuntimeError with podman's own words unless podman can run here (container mode needs it)."""
    try:
        result = subprocess.run(
            ["podman", "info", "--format={{.Host.OCIRuntime.Name}}"], env=env, capture_output=True, text=True
        )
    except OSError as exc:
        raise RuntimeError(f"container mode needs podman: {exc} (dpo-localcluster images installs it)") from exc
    if result.returncode != 0:
        raise RuntimeError(f"container mode needs a working podman: {result.stderr.strip()}")
