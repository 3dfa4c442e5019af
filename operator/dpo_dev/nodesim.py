"""Node simulator: fake Nodes for the real scheduler, and a kubelet stand-in for the pods bound to them.

Why: the local control plane has no kubelet and no container runtime, and the machines have no GPUs; yet the
operator must be tested against the real scheduler, Job controller and pod log stream. Like the Kubernetes
SIG project kwok, this registers Nodes (with ``nvidia.com/gpu`` capacity, labels, taints) and keeps them
Ready with Lease heartbeats. For each pod the scheduler binds to them it either

* **simulates** the container (scripted by a rule or pod annotations: run N seconds, exit code, reason such
  as OOMKilled, termination message, log lines; restarts per restartPolicy), or
* runs it as a **process**: the container's command/args with the pod's resolved env, volumes materialised
  into local dirs (paths rewritten), the local Python environment standing in for the image; each pod has a
  loopback address of its own, a bound service-account token where a kubelet would mount one (in a private
  mount namespace), and its startup/readiness/liveness probes run, or
* runs it as a **container**: podman runs the pod's image with the pod spec applied as a kubelet applies it
  (command/args, env, volumes as mounts, user and fsGroup, read-only root, no new privileges, dropped
  capabilities, memory/CPU limits with OOM kills reported as OOMKilled, termination message, grace period),
  on the host network so the pod IP, probes and 127.0.0.1 services work as in process mode.

It reports Pending -> Running -> Succeeded/Failed into pod status, deletes terminating pods (there is no
kubelet to do it), and serves the kubelet ``/containerLogs`` endpoint over HTTPS so ``kubectl logs [-f]``
and ``read_namespaced_pod_log(follow=True)`` work through the apiserver.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import http.client
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, unquote, urlparse

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity
from kubernetes.watch.watch import iter_resp_lines

from . import images
from .cluster import die_with_parent, processes_in_groups

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "nodesim.dpo.dev/"
NOT_READY_TAINT = "node.kubernetes.io/not-ready"
GPU_RESOURCE = "nvidia.com/gpu"
KUBELET_VERSION = "v1.20.2-nodesim"
TERMINATION_MESSAGE_MAX = 4096  # kubelet's per-container cap
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # kubelet's FallbackToLogsOnError tail
LOG_LINE_MAX = 16 * 1024  # containerd's maximum log line: longer ones become partial records
DEFAULT_PULL_ERROR_MARKERS = ("does-not-exist",)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster clients look
TOKEN_EXPIRATION_S = 3607  # what the kubelet asks TokenRequest for
TOKEN_REFRESH_AT = 0.8  # the kubelet renews a token after 80% of its lifetime
POD_NETWORK, POD_NETWORK_SIZE = "127.77", 256 * 254  # pod IPs 127.77.x.y: all of 127.0.0.0/8 is local on Linux
MODES = ("process", "simulate", "container")
SIMULATOR_LABEL = f"{ANNOTATION_PREFIX}simulator"  # on every podman container: the simulator that started it
PROBE_DEFAULTS = {  # Kubernetes' defaults
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> dt.datetime:
    """RFC 3339 (with or without fractional seconds, nanoseconds truncated) to an aware datetime."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", value.strip())
    if not match:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    base, frac, zone = match.groups()
    text = base + (f".{(frac or '0')[:6]:0<6}") + ("+00:00" if zone == "Z" else zone)
    return dt.datetime.fromisoformat(text)


@dataclass
class NodeSpec:
    """A fake Node: what the scheduler sees."""

    name: str
    cpu: str = "8"
    memory: str = "32Gi"
    gpus: int = 0
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict[str, str]] = field(default_factory=list)  # [{"key", "value", "effect"}]

    def capacity(self) -> dict[str, str]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": str(self.pods), "ephemeral-storage": "100Gi"}
        if self.gpus:
            capacity[GPU_RESOURCE] = str(self.gpus)
        return capacity


@dataclass(frozen=True)
class Outcome:
    """A scripted container run (simulate mode): log lines, then exit after ``duration_s``."""

    exit_code: int = 0
    duration_s: float = 0.2
    reason: str | None = None  # default: Completed (exit 0) / Error
    message: str = ""  # termination message
    logs: str = ""

    @classmethod
    def from_annotations(cls, annotations: dict[str, str]) -> Outcome | None:
        """The outcome scripted by ``nodesim.dpo.dev/{exit-code,duration,reason,message,logs}`` annotations."""
        keys = {k[len(ANNOTATION_PREFIX) :]: v for k, v in annotations.items() if k.startswith(ANNOTATION_PREFIX)}
        scripted = {"exit-code", "duration", "reason", "message", "logs"} & keys.keys()
        if keys.get("mode") != "simulate" and not scripted:
            return None
        return cls(
            exit_code=int(keys.get("exit-code", 0)),
            duration_s=float(keys.get("duration", cls.duration_s)),
            reason=keys.get("reason"),
            message=keys.get("message", ""),
            logs=keys.get("logs", ""),
        )


RUN_FOREVER = Outcome(duration_s=math.inf)
# A rule sees (pod, container name, restart count) and returns an Outcome to simulate, or None to pass.
Rule = Callable[[dict, str, int], "Outcome | None"]


class ContainerConfigError(Exception):
    """The container cannot be configured yet (missing Secret/ConfigMap): kubelet's CreateContainerConfigError."""


# --- container logs (CRI-like files: "<time> stdout <F|P> <content>") ---------------------------------


class LogFile:
    """One container attempt's log; ``finished`` ends follow streams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished = threading.Event()
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def write(self, content: bytes, stream: str = "stdout") -> None:
        """Append one record: a line with its newline (F), or a partial line without (P)."""
        full = content.endswith(b"\n")
        record = f"{_now_micro()} {stream} {'F' if full else 'P'} ".encode() + content.rstrip(b"\n") + b"\n"
        with self._lock, self.path.open("ab") as out:
            out.write(record)

    def pump(self, pipe: IO[bytes], stream: str) -> None:
        """Copy a process's output stream line by line, as the container runtime does (lines over 16 KiB are
        split into partial records), so stdout lines never mix with, e.g., stderr progress bars."""
        for line in iter(lambda: pipe.readline(LOG_LINE_MAX), b""):
            self.write(line, stream)

    def read_tail(self, max_lines: int, max_bytes: int) -> str:
        lines = [_parse_record(r)[1] for r in _split_records(self.path.read_bytes())[0]]
        text = b"".join(lines[-max_lines:])[-max_bytes:]
        return text.decode(errors="replace")


def _split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete records (newline-terminated) and the unfinished rest. Only \\n ends a record: a \\r inside
    a line (progress bars) must not split it, so bytes.splitlines() is not usable here."""
    *records, rest = data.split(b"\n")
    return [r + b"\n" for r in records], rest


def _parse_record(record: bytes) -> tuple[str, bytes]:
    """(timestamp, content as the container wrote it) from one stored log record."""
    parts = record.rstrip(b"\n").split(b" ", 3)
    stamp, _stream, tag, content = parts + [b""] * (4 - len(parts))
    return stamp.decode(), content + (b"\n" if tag == b"F" else b"")


# --- per-container state and status -------------------------------------------------------------------


@dataclass
class _Container:
    spec: dict
    init: bool
    restart_count: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    container_id: str = ""
    image_id: str = ""  # the local image a container-mode attempt ran
    exit_code: int = 0
    final: bool = False  # terminated and not going to restart
    logs: list[LogFile] = field(default_factory=list)
    started: bool = False  # the startup probe has succeeded (or there is none); counts while running
    ready: bool = False  # the readiness probe has succeeded (or there is none); counts while running

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def is_ready(self) -> bool:
        return "running" in self.state and self.ready and not self.init

    def status(self) -> dict:
        status = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": self.image_id or (f"nodesim://{self.spec.get('image', '')}" if self.container_id else ""),
            "ready": self.is_ready,
            "restartCount": self.restart_count,
            "started": "running" in self.state and self.started,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


class _PodRunner:
    """Plays one pod: init containers in order, then the containers in parallel, with restarts."""

    def __init__(self, sim: NodeSimulator, pod: dict, ip: str) -> None:
        self.sim = sim
        self.pod = pod
        self.ip = ip
        meta, spec = pod["metadata"], pod["spec"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.dir = sim.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.init_containers = [_Container(c, True) for c in spec.get("initContainers") or []]
        self.containers = [_Container(c, False) for c in spec.get("containers") or []]
        self.in_container = sim.in_container(pod)  # its unscripted containers run with podman
        self.stopping = threading.Event()
        self.processes: list[subprocess.Popen] = []  # container mode: the `podman wait` of each container
        self.start_time = _now()
        self._conditions: dict[str, tuple[str, str, str]] = {}  # type -> (status, time, reason)
        self._status_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"nodesim-pod-{self.name}", daemon=True)
        self._volumes: dict[str, Path] = {}
        self._token_dir: Path | None = None  # the projected service-account files, when the pod gets them
        self._token_refresh_at = 0.0  # time.monotonic() when the token is due for renewal

    def start(self) -> None:
        self._thread.start()

    def container(self, name: str) -> _Container | None:
        return next((c for c in [*self.init_containers, *self.containers] if c.name == name), None)

    # --- status
    @property
    def initialized(self) -> bool:
        return all(c.final and c.exit_code == 0 for c in self.init_containers)

    @property
    def phase(self) -> str:
        """The pod phase a kubelet derives from its containers."""
        if any(c.final and c.exit_code != 0 for c in self.init_containers):
            return "Failed"
        if not self.initialized:
            return "Pending"
        if all(c.final for c in self.containers):
            return "Failed" if any(c.exit_code != 0 for c in self.containers) else "Succeeded"
        return "Running" if any(c.logs for c in self.containers) else "Pending"

    def _condition(self, kind: str, ok: bool, reason: str = "") -> dict:
        status = "True" if ok else "False"
        previous = self._conditions.get(kind)
        if previous is None or previous[0] != status:
            self._conditions[kind] = (status, _now(), reason)
        status, when, reason = self._conditions[kind]
        condition = {"type": kind, "status": status, "lastProbeTime": None, "lastTransitionTime": when}
        if reason:
            condition["reason"] = reason
        return condition

    def report(self) -> None:
        """Write the whole pod status (as a kubelet does) with a JSON merge patch."""
        with self._status_lock:
            if self.stopping.is_set():
                return
            phase, initialized = self.phase, self.initialized
            ready = phase == "Running" and all(c.is_ready for c in self.containers)
            not_ready = "" if ready else ("PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady")
            status = {
                "phase": phase,
                "hostIP": self.sim.address,
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "startTime": self.start_time,
                "conditions": [
                    self._condition("Initialized", initialized, "" if initialized else "ContainersNotInitialized"),
                    self._condition("Ready", ready, not_ready),
                    self._condition("ContainersReady", ready, not_ready),
                    self._condition("PodScheduled", True),
                ],
                "containerStatuses": [c.status() for c in self.containers],
            }
            if self.init_containers:
                status["initContainerStatuses"] = [c.status() for c in self.init_containers]
            try:
                self.sim.core.patch_namespaced_pod_status(
                    self.name, self.namespace, {"status": status}, _content_type="application/merge-patch+json"
                )
            except ApiException as exc:
                if exc.status == 404:
                    self.stopping.set()
                else:
                    log.warning("nodesim: status of %s/%s not written: %s", self.namespace, self.name, exc)

    # --- lifecycle
    def _run(self) -> None:
        try:
            self._play()
        except Exception:
            log.exception("nodesim: the runner of pod %s/%s crashed", self.namespace, self.name)

    def _play(self) -> None:
        self.report()
        pull_errors = [
            (c, error)
            for c in self.init_containers + self.containers
            if (error := self.sim.image_pull_error(self.pod, c.spec)) is not None
        ]
        if pull_errors:
            self._fail_pull(pull_errors)
            return
        while not self._configure():
            if self.stopping.wait(2.0):
                return
        if self._token_dir is not None:
            threading.Thread(target=self._renew_token, name=f"nodesim-token-{self.name}", daemon=True).start()
        for container in self.init_containers:
            if self._run_container(container) != 0:
                return
        threads = [
            threading.Thread(target=self._run_container, args=(c,), name=f"nodesim-{self.name}-{c.name}", daemon=True)
            for c in self.containers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _fail_pull(self, errors: list[tuple[_Container, str]]) -> None:
        """What a kubelet shows for an image that cannot be pulled: ErrImagePull, then ImagePullBackOff."""
        for container, error in errors:
            container.state = {"waiting": {"reason": "ErrImagePull", "message": error}}
        self.report()
        if self.stopping.wait(self.sim.pull_backoff_s):
            return
        for container, _ in errors:
            message = f'Back-off pulling image "{container.spec["image"]}"'
            container.state = {"waiting": {"reason": "ImagePullBackOff", "message": message}}
        self.report()

    def _configure(self) -> bool:
        """Materialise volumes, resolve env and project the service-account token; on a missing
        Secret/ConfigMap/ServiceAccount show CreateContainerConfigError."""
        try:
            if self.sim.needs_process(self.pod):
                self._volumes = self.sim.materialize_volumes(self.pod, self.dir)
                if self.in_container:
                    self.sim.own_volumes(self.pod, self._volumes)
                for container in self.init_containers + self.containers:
                    self.sim.resolve_env(self.pod, container.spec, self.ip)
                if self.sim.automounts_token(self.pod):
                    self._project_token()
        except ContainerConfigError as exc:
            for container in self.init_containers + self.containers:
                container.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            self.report()
            return False
        return True

    def _project_token(self) -> None:
        """Write token, ca.crt and namespace as the kubelet's projected service-account volume holds them."""
        requested = time.monotonic()
        token, lifetime = self.sim.service_account_token(self.pod)
        directory = self.dir / "kubernetes.io~serviceaccount"  # no container dir can have this name
        directory.mkdir(parents=True, exist_ok=True)
        # A non-root image must read it: 0644 is the defaultMode of the kube-api-access volume Kubernetes adds.
        for name, data, mode in (
            ("ca.crt", self.sim.ca_pem, 0o644),
            ("namespace", self.namespace.encode(), 0o644),
            ("token", token.encode(), 0o644 if self.in_container else 0o600),
        ):
            _write_atomically(directory / name, data, mode)
        self._token_dir, self._token_refresh_at = directory, requested + TOKEN_REFRESH_AT * lifetime

    def _renew_token(self) -> None:
        """Renew the token in place (the containers see the new file) at 80% of its life, as the kubelet does."""
        while not self.stopping.wait(max(0.0, self._token_refresh_at - time.monotonic())):
            if self.phase in ("Succeeded", "Failed"):
                return
            try:
                self._project_token()
            except (ApiException, ContainerConfigError, OSError) as exc:
                log.warning("nodesim: token of %s/%s not renewed (retrying): %s", self.namespace, self.name, exc)
                self._token_refresh_at = time.monotonic() + 10.0

    def _run_container(self, container: _Container) -> int:
        """Run (and restart per restartPolicy) one container; returns its last exit code."""
        backoff = self.sim.restart_backoff_s
        while not self.stopping.is_set():
            logfile = LogFile(self.dir / container.name / f"{container.restart_count}.log")
            container.container_id = f"nodesim://{uuid.uuid4().hex}"
            outcome = self.sim.outcome_for(self.pod, container.name, container.restart_count)
            probed = outcome is None and not container.init  # probes run for process- and container-mode ones
            container.started = not (probed and "startupProbe" in container.spec)
            container.ready = container.started and not (probed and "readinessProbe" in container.spec)
            if outcome is not None or not self.in_container:  # a container runs once podman has started it
                self._running(container, logfile, _now())
            try:
                exit_code, reason, message = self._execute(container, logfile, outcome)
            finally:
                logfile.finished.set()
            if logfile not in container.logs:  # it never started: the log holds why
                container.logs.append(logfile)
            terminated = {
                "exitCode": exit_code,
                "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                "startedAt": container.state.get("running", {}).get("startedAt") or _now(),
                "finishedAt": _now(),
                "containerID": container.container_id,
            }
            if message:
                terminated["message"] = message
            container.exit_code = exit_code
            restart = self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and exit_code != 0)
            if (container.init and exit_code == 0) or not restart:
                container.state, container.final = {"terminated": terminated}, True
                self.report()
                return exit_code
            container.last_state = {"terminated": terminated}
            container.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {backoff:g}s restarting failed container={container.name} pod={self.name}",
                }
            }
            self.report()
            if self.stopping.wait(backoff):
                break
            backoff = min(backoff * 2, self.sim.max_restart_backoff_s)
            container.restart_count += 1
        return 137

    def _running(self, container: _Container, logfile: LogFile, started_at: str) -> None:
        """The attempt has started: its log becomes readable and the status says running."""
        container.logs.append(logfile)
        container.state = {"running": {"startedAt": started_at}}
        self.report()

    def _execute(self, container: _Container, logfile: LogFile, outcome: Outcome | None) -> tuple[int, str | None, str]:
        if outcome is not None:
            return self._simulate(outcome, logfile)
        try:
            return self._container(container, logfile) if self.in_container else self._process(container, logfile)
        except ContainerConfigError as exc:  # a Secret/ConfigMap vanished between attempts, or runAsNonRoot
            logfile.write(str(exc).encode())
            return 128, "CreateContainerConfigError", str(exc)

    def _simulate(self, outcome: Outcome, logfile: LogFile) -> tuple[int, str | None, str]:
        lines = outcome.logs.split("\n") if outcome.logs else []
        for line in lines[:-1] if outcome.logs.endswith("\n") else lines:
            logfile.write(line.encode() + b"\n")
        if self.stopping.wait(outcome.duration_s if math.isfinite(outcome.duration_s) else None):
            return 137, None, ""
        return outcome.exit_code, outcome.reason, outcome.message[:TERMINATION_MESSAGE_MAX]

    def _process(self, container: _Container, logfile: LogFile) -> tuple[int, str | None, str]:
        spec = container.spec
        termination_path = self.dir / container.name / "termination-log"
        termination_path.write_bytes(b"")
        rewrite = _path_rewriter(spec, self._volumes, termination_path)
        resolved = self.sim.resolve_env(self.pod, spec, self.ip)
        env = self.sim.service_env | {k: rewrite(v) for k, v in resolved.items()}  # as the kubelet orders them
        command = [rewrite(_expand(a, env)) for a in spec.get("command") or []]
        args = [rewrite(_expand(a, env)) for a in spec.get("args") or []]
        if not command:
            command = self.sim.entrypoint(spec.get("image", ""))
            if not command:
                message = f'no command and no known entrypoint for image "{spec.get("image")}"'
                logfile.write(message.encode())
                return 128, "StartError", message
        env = self.sim.base_env(self.name) | env
        argv, pending = [*command, *args], None
        if self._token_dir is not None:  # a missing executable would fail only at the wrapper's exec: check first
            if os.sep not in command[0] and not shutil.which(command[0], path=env["PATH"]):
                message = f"failed to start {command[0]!r}: executable file not found in $PATH"
                logfile.write(message.encode())
                return 128, "StartError", message
            pending = self.dir / container.name / "token-mount-pending"
            pending.touch()
            argv = _with_token_mount(argv, self._token_dir, pending)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self.sim.cwd,
                start_new_session=True,
                preexec_fn=die_with_parent,  # this thread waits for it, so the death signal is safe here
            )
        except OSError as exc:
            message = f"failed to start {argv[0]!r}: {exc}"
            message = message if pending is None else _token_mount_error(message)
            logfile.write(message.encode())
            return 128, "StartError", message
        self._started(proc)
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr

        def wait() -> int:
            pump = threading.Thread(target=logfile.pump, args=(stderr, "stderr"), daemon=True)
            pump.start()
            logfile.pump(stdout, "stdout")
            pump.join()
            return proc.wait()

        code = self._supervise(container, proc, wait)
        if pending is not None and pending.exists():  # the command never ran
            message = _token_mount_error(logfile.read_tail(FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES).strip())
            logfile.write(message.encode())
            return 128, "StartError", message
        exit_code = 128 - code if code < 0 else code
        return exit_code, None, _termination_message(spec, termination_path, exit_code, logfile)

    def _container(self, container: _Container, logfile: LogFile) -> tuple[int, str | None, str]:
        """Run the container with podman from its image, as a kubelet does through its container runtime."""
        spec, sim = container.spec, self.sim
        image = sim.local_image(spec.get("image", ""))
        if image is None:  # removed from storage since the pull check
            message = f'image "{spec.get("image")}" is not in local storage'
            logfile.write(message.encode())
            return 128, "StartError", message
        # podman's working directory is conmon's, and conmon 2.1 leaves its OOM marker there (see _oom_killed).
        attempt = self.dir / container.name / f"attempt-{container.restart_count}"
        attempt.mkdir(parents=True, exist_ok=True)
        termination = attempt / "termination-log"
        termination.touch()
        termination.chmod(0o666)  # the kubelet's mode: any container user may write its message
        env = sim.service_env | sim.resolve_env(self.pod, spec, self.ip)  # as the kubelet orders them
        run = ContainerRun(
            name=_container_name(self.pod, container.name, container.restart_count),
            image=image[0],
            image_user=image[1].get("User") or "",
            command=[_expand(a, env) for a in spec.get("command") or []],
            args=[_expand(a, env) for a in spec.get("args") or []],
            env_file=attempt / "env",
            volumes=self._volumes,
            termination=termination,
            token_dir=self._token_dir,
            log=logfile.path,
            labels={
                SIMULATOR_LABEL: sim.id,
                "io.kubernetes.pod.namespace": self.namespace,
                "io.kubernetes.pod.name": self.name,
                "io.kubernetes.pod.uid": self.uid,
                "io.kubernetes.container.name": container.name,
            },
            passed_env=tuple(name for name, value in env.items() if "\n" in value),
        )
        argv = podman_run_args(self.pod, spec, run)  # raises ContainerConfigError (runAsNonRoot)
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
        self._running(container, logfile, _rfc3339(state.get("StartedAt", "")))
        proc = _PodmanWait(run.name, sim.podman_env())
        self._started(proc)
        self._supervise(container, proc, proc.wait)
        state = sim.container_state(run.name)
        sim.remove_containers([run.name])
        exit_code = int(state.get("ExitCode", 137))
        reason = "OOMKilled" if _oom_killed(state, attempt) else None
        return exit_code, reason, _termination_message(spec, termination, exit_code, logfile)

    def _started(self, proc: subprocess.Popen) -> None:
        self.sim.track(proc)
        self.processes.append(proc)
        if self.stopping.is_set():  # deletion raced the start
            self.sim.kill_group(proc, 0)

    def _supervise(self, container: _Container, proc: subprocess.Popen, wait: Callable[[], int]) -> int:
        """Run the container's probes while ``wait`` waits for it to end; returns what ``wait`` returns."""
        exited = threading.Event()
        probes = [
            threading.Thread(
                target=self._probe, args=(container, kind, proc, exited), name=f"nodesim-{kind}", daemon=True
            )
            for kind in ("startup", "readiness", "liveness")
            if f"{kind}Probe" in container.spec and not container.init
        ]
        for probe in probes:
            probe.start()
        try:
            return wait()
        finally:
            exited.set()
            for probe in probes:  # none may act on the next attempt
                probe.join()

    # --- probes
    def _probe(self, container: _Container, kind: str, proc: subprocess.Popen, exited: threading.Event) -> None:
        """A kubelet probe worker for one container attempt: ``kind`` is startup, readiness or liveness.

        It probes every periodSeconds after initialDelaySeconds (readiness and liveness only once the startup
        probe has succeeded); a result counts after successThreshold/failureThreshold equal ones in a row.
        """
        probe = PROBE_DEFAULTS | container.spec[f"{kind}Probe"]
        if not {"httpGet", "tcpSocket"} & probe.keys():
            what = f"{self.namespace}/{self.name} container {container.name}"
            log.warning("nodesim: %s: only httpGet and tcpSocket probes run; its %s probe always succeeds", what, kind)
        if exited.wait(probe["initialDelaySeconds"]):
            return
        last, run = None, 0
        while True:
            if kind == "startup" or container.started:
                ok = self._probe_once(container.spec, probe)
                run, last = (run + 1 if ok == last else 1), ok
                threshold = probe["successThreshold" if ok else "failureThreshold"]
                if exited.is_set() or (run >= threshold and not self._probe_result(container, kind, ok, proc)):
                    return
            if exited.wait(probe["periodSeconds"]):
                return

    def _probe_once(self, spec: dict, probe: dict) -> bool:
        """One probe; the host defaults to the pod IP, a named port is looked up in the container's ports."""
        timeout = float(probe["timeoutSeconds"])
        action = probe.get("httpGet") or probe.get("tcpSocket")
        if action is None:
            return True
        host, port = action.get("host") or self.ip, _container_port(spec, action["port"])
        if port is None:
            return False
        if "httpGet" in probe:
            headers = {h["name"]: h["value"] for h in action.get("httpHeaders") or []}
            return _http_probe(action.get("scheme", "HTTP"), host, port, action.get("path") or "/", headers, timeout)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError:
            return False
        return True

    def _probe_result(self, container: _Container, kind: str, ok: bool, proc: subprocess.Popen) -> bool:
        """Act on a result that crossed its threshold, as the kubelet does; False ends the worker."""
        if kind == "readiness":
            if container.ready != ok:
                container.ready = ok
                self.report()
            return True
        if ok:
            if kind == "startup":  # started: readiness and liveness begin; no readiness probe means ready
                container.started, container.ready = True, "readinessProbe" not in container.spec
                self.report()
            return kind == "liveness"
        log.info(
            "nodesim: %s/%s: container %s failed its %s probe, killing it",
            self.namespace,
            self.name,
            container.name,
            kind,
        )
        grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        self.sim.kill_group(proc, min(grace, self.sim.max_grace_s))
        return False

    def kill(self, grace: float) -> None:
        """Stop simulating/running the pod: SIGTERM its containers, SIGKILL after ``grace`` seconds."""
        self.stopping.set()
        for proc in list(self.processes):
            self.sim.kill_group(proc, grace)
        self._thread.join(timeout=grace + 5)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the newest container attempt, as `kill` on the node would; restartPolicy does the rest."""
        if not self.processes:
            raise RuntimeError(f"pod {self.namespace}/{self.name} has no container running on the simulated node")
        self.sim.signal(self.processes[-1], sig)


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined vars are substituted, $$ escapes, unknown refs stay as written."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


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


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` in one step, so a reader (a client re-reading its token) never sees half a file."""
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_bytes(data)
    staging.chmod(mode)
    os.replace(staging, path)


def _container_port(spec: dict, port: int | str) -> int | None:
    """A probe's port: a number, or the name of one of the container's ports (a numeric string as a number)."""
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in spec.get("ports") or []}
    return named.get(port) or (int(port) if port.isdigit() else None)


def _http_probe(scheme: str, host: str, port: int, path: str, headers: dict[str, str], timeout: float) -> bool:
    """An httpGet probe: any status from 200 to 399 succeeds (HTTPS unverified, as the kubelet probes)."""
    if scheme.upper() == "HTTPS":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": "kube-probe/1.20", **headers})
        return 200 <= connection.getresponse().status < 400
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _termination_message(spec: dict, path: Path, exit_code: int, logfile: LogFile) -> str:
    """The file at terminationMessagePath (capped as the kubelet caps it), or with FallbackToLogsOnError the
    log's tail when the container failed without writing one."""
    message = path.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace")
    if not message and exit_code != 0 and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = logfile.read_tail(FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
    return message


# --- container mode: podman --------------------------------------------------------------------------------


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


def _set_group(root: Path, gid: int, writable: bool) -> None:
    """The kubelet's fsGroup ownership: group ``gid`` on everything, group read(-write) on files, setgid and
    group access on directories (read-only volumes get no group write)."""
    file_bits, dir_bits = (0o660, 0o2770) if writable else (0o440, 0o2550)
    for directory, _, files in os.walk(root):
        entries = [(directory, dir_bits)] + [(os.path.join(directory, name), file_bits) for name in files]
        for path, bits in entries:
            if not os.path.islink(path):
                os.chown(path, -1, gid)
                os.chmod(path, os.stat(path).st_mode & 0o7777 | bits)


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


# --- the kubelet log endpoint --------------------------------------------------------------------------


class _TLSServer(ThreadingHTTPServer):
    """HTTPS with the TLS handshake in the request thread (a slow client can't block accept)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext, sim: NodeSimulator):
        super().__init__(address, handler)
        self.context = context
        self.sim = sim

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError):
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("nodesim: kubelet endpoint error for %s", client_address, exc_info=True)


class _KubeletHandler(BaseHTTPRequestHandler):
    """GET /containerLogs/{namespace}/{pod}/{container}: what the apiserver proxies ``kubectl logs`` to."""

    server: _TLSServer
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: simplest for follow streams

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("nodesim kubelet: " + format, *args)

    def _error(self, code: int, message: str) -> None:
        body = message.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._error(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._error(404, f"not found: {url.path}")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        _, namespace, pod, name = parts
        runner = self.server.sim.runner(namespace, pod)
        container = runner.container(name) if runner else None
        if runner is None or container is None:
            self._error(404, f'container "{name}" in pod "{pod}" not found in namespace "{namespace}"')
            return
        previous = query.get("previous") == "true"
        attempts = container.logs[:-1] if previous else container.logs
        if not attempts:
            reason = container.state.get("waiting", {}).get("reason", "ContainerCreating")
            if previous:
                self._error(400, f'previous terminated container "{name}" in pod "{pod}" not found')
            else:
                self._error(400, f'container "{name}" in pod "{pod}" is waiting to start: {reason}')
            return
        self._stream(attempts[-1], query, follow=query.get("follow") == "true" and not previous)

    def _stream(self, logfile: LogFile, query: dict[str, str], follow: bool) -> None:
        since: dt.datetime | None = None
        try:
            if "sinceTime" in query:
                since = _parse_time(query["sinceTime"])
            elif "sinceSeconds" in query:
                since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(query["sinceSeconds"]))
            tail_lines = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError as exc:
            self._error(400, str(exc))
            return
        timestamps = query.get("timestamps") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        sent = 0

        def emit(records: list[bytes]) -> bool:
            nonlocal sent
            out = bytearray()
            for record in records:
                stamp, content = _parse_record(record)
                if since is not None and _parse_time(stamp) < since:
                    continue
                out += (stamp.encode() + b" " if timestamps else b"") + content
            if limit is not None:
                out = out[: max(0, limit - sent)]
            if out:
                self.wfile.write(out)
                self.wfile.flush()
                sent += len(out)
            return limit is None or sent < limit

        try:
            with logfile.path.open("rb") as handle:
                records, partial = _split_records(handle.read())
                if tail_lines is not None:
                    records = records[-tail_lines:] if tail_lines > 0 else []
                if not emit(records) or not follow:
                    return
                while True:
                    finished = logfile.finished.is_set()  # read after the flag: nothing is lost at the end
                    chunk = handle.read()
                    if chunk:
                        records, partial = _split_records(partial + chunk)
                        if not emit(records):
                            return
                    elif finished:
                        return
                    else:
                        logfile.finished.wait(0.1)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return


def _self_signed_cert(directory: Path, address: str) -> tuple[Path, Path]:
    """A throwaway serving cert for the kubelet endpoint (the apiserver does not verify kubelets here)."""
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not cert.exists():
        directory.mkdir(parents=True, exist_ok=True)
        san = f"IP:{address}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", address) else f"DNS:{address}"
        command = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj /CN=nodesim"
        subprocess.run(
            ["openssl", *command.split(), "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
    return cert, key


# --- the simulator ----------------------------------------------------------------------------------------


class NodeSimulator:
    """Fake Nodes plus a kubelet stand-in, running in threads of this process.

    Usage::

        sim = NodeSimulator(kubeconfig, [NodeSpec("gpu-0", gpus=2)], mode="process").start()
        with sim.scripted(lambda pod, container, restarts: Outcome(exit_code=1, reason="OOMKilled")):
            ...  # pods now simulate an OOM kill
        sim.stop()

    Per pod, the first match decides how a container runs: a DaemonSet pod is simulated running forever;
    then the scripted rules (newest first); then annotations (``nodesim.dpo.dev/mode:
    process|simulate|container``, ``nodesim.dpo.dev/{exit-code,duration,reason,message,logs}``); then the
    simulator's ``mode``.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        nodes: Sequence[NodeSpec],
        *,
        mode: str = "process",
        workdir: Path | None = None,
        cwd: Path | None = None,
        bin_dir: Path | None = None,
        env: dict[str, str] | None = None,
        image_entrypoints: dict[str, list[str]] | None = None,
        preloaded_images: dict[str, str] | None = None,
        address: str = "127.0.0.1",
        pull_error_markers: Sequence[str] = DEFAULT_PULL_ERROR_MARKERS,
        pull_backoff_s: float = 2.0,
        restart_backoff_s: float = 1.0,
        max_restart_backoff_s: float = 10.0,
        max_grace_s: float = 10.0,
        heartbeat_s: float = 10.0,
        delete_nodes_on_stop: bool = True,
        provision_volumes: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.kubeconfig = Path(kubeconfig)
        self.nodes = {n.name: n for n in nodes}
        self.mode = mode
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dpo-nodesim-"))
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self.bin_dir = Path(bin_dir) if bin_dir else Path(sys.executable).parent
        self.extra_env = dict(env or {})
        self.image_entrypoints = dict(image_entrypoints or {})
        # Container mode: pod image name -> local reference, as `kind load` puts an image on a node under the
        # name pods use (e.g. the operator's default trainer image, ghcr.io/..., as localhost/dpo-trainer).
        self.preloaded_images = dict(preloaded_images or {})
        self.address = address
        self.pull_error_markers = tuple(pull_error_markers)
        self.pull_backoff_s = pull_backoff_s
        self.restart_backoff_s = restart_backoff_s
        self.max_restart_backoff_s = max_restart_backoff_s
        self.max_grace_s = max_grace_s
        self.heartbeat_s = heartbeat_s
        self.delete_nodes_on_stop = delete_nodes_on_stop
        self.provision_volumes = provision_volumes
        self._rules: list[Rule] = []
        self._registered_at: dict[str, str] = {}
        self._runners: dict[str, _PodRunner] = {}  # by pod uid
        self._by_name: dict[tuple[str, str], _PodRunner] = {}
        self._deleting: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watch_responses: set[Any] = set()
        self._processes: list[subprocess.Popen] = []
        self._pod_ips: dict[str, str] = {}  # by pod uid
        self._next_pod_ip = random.randrange(POD_NETWORK_SIZE)  # simulators on one machine rarely overlap
        self._server: _TLSServer | None = None
        self.api: client.ApiClient | None = None
        self.core: client.CoreV1Api
        self.ca_pem = b""  # the cluster CA, for the pods' ca.crt
        self.service_env: dict[str, str] = {}  # KUBERNETES_SERVICE_HOST/PORT: the API server of our kubeconfig
        self.id = uuid.uuid4().hex[:12]  # the SIMULATOR_LABEL value of its containers
        self.containers_started: set[str] = set()  # podman names, removed when they end and again on stop()
        self._podman_env: dict[str, str] | None = None

    # --- public
    @property
    def kubelet_port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    def start(self, timeout: float = 60.0) -> NodeSimulator:
        """Serve the kubelet endpoint, register the Nodes, and wait until the scheduler may use them."""
        if self.mode == "container":  # fail here, not pod by pod
            check_podman(self.podman_env())
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 64
        self.api = client.ApiClient(configuration)
        if configuration.ssl_ca_cert:  # the client keeps certificate-authority(-data) as a file
            self.ca_pem = Path(configuration.ssl_ca_cert).read_bytes()
        server = urlparse(configuration.host)
        self.service_env = {
            "KUBERNETES_SERVICE_HOST": server.hostname or "",
            "KUBERNETES_SERVICE_PORT": str(server.port or 443),
        }
        self.core = client.CoreV1Api(self.api)
        cert, key = _self_signed_cert(self.workdir / "tls", self.address)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._server = _TLSServer((self.address, 0), _KubeletHandler, context, self)
        self._thread(self._server.serve_forever, "nodesim-kubelet")
        try:
            for node in self.nodes.values():
                self._register(node)
            self._thread(self._heartbeat, "nodesim-heartbeat")
            self._thread(self._watch_pods, "nodesim-watch-pods")
            if self.provision_volumes:
                self._thread(self._watch_claims, "nodesim-watch-claims")
            self._wait_schedulable(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every pod process, stop the threads and the endpoint, and delete the Nodes."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            runners = list(self._runners.values())
        for runner in runners:
            runner.stopping.set()
        for runner in runners:
            runner.kill(0)
        self.remove_containers(sorted(self.containers_started))  # any a runner did not get to remove
        for response in list(self._watch_responses):  # unblock the watch threads' reads
            with contextlib.suppress(Exception):
                response.connection.sock.shutdown(socket.SHUT_RDWR)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)
        if self.delete_nodes_on_stop and self.api is not None:
            for name in self.nodes:
                with contextlib.suppress(ApiException, OSError):
                    self.core.delete_node(name)
        if self.api is not None:
            self.api.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NodeSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def scripted(self, rule: Rule) -> Iterator[None]:
        """Simulate the containers ``rule`` returns an Outcome for, while the block runs."""
        with self._lock:
            self._rules.insert(0, rule)
        try:
            yield
        finally:
            with self._lock:
                self._rules.remove(rule)

    def process_groups(self) -> list[int]:
        """Process-group ids of every container process (and `podman wait`) ever started (for leak checks)."""
        return [p.pid for p in self._processes]

    def containers(self) -> list[str]:
        """Names of the podman containers this simulator started that still exist (for leak checks)."""
        if not self.containers_started:
            return []
        result = self.podman("ps", "--all", f"--filter=label={SIMULATOR_LABEL}={self.id}", "--format={{.Names}}")
        if result.returncode != 0:
            raise RuntimeError(f"podman ps failed: {result.stderr.strip()}")
        return result.stdout.split()

    def running_pids(self) -> list[int]:
        """PIDs of processes still alive in any container's process group."""
        return processes_in_groups(self.process_groups())

    def runner(self, namespace: str, name: str) -> _PodRunner | None:
        with self._lock:
            return self._by_name.get((namespace, name))

    # --- hooks for runners
    def track(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._processes.append(proc)

    def kill_group(self, proc: subprocess.Popen, grace: float) -> None:
        """SIGTERM the container, SIGKILL it after ``grace`` seconds (see signal)."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            self.signal(proc, sig)
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            if sig == signal.SIGTERM and not isinstance(proc, _PodmanWait):  # a container's die with its PID 1
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group
            return

    def signal(self, proc: subprocess.Popen, sig: int) -> None:
        """Send ``sig`` to a container: its process group, or through `podman kill` for a podman one."""
        if isinstance(proc, _PodmanWait):
            self.podman("kill", f"--signal={int(sig)}", proc.container)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)

    def image_pull_error(self, pod: dict, spec: dict) -> str | None:
        """Why the container's image cannot be pulled, or None. Names with a marker never can; a container to
        run with podman needs its image in local storage, as nothing is pulled."""
        image = spec.get("image", "")
        if any(marker in image for marker in self.pull_error_markers):
            return f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": not found'
        if not self.in_container(pod) or self.outcome_for(pod, spec["name"], 0) is not None:
            return None
        if shutil.which("podman") is None:
            return "container mode needs podman, which is not installed (dpo-localcluster images installs it)"
        if self.local_image(image) is None:
            return (
                f'image "{image}" is not in local storage (looked for {" and ".join(self.local_image_refs(image))}); '
                "the node simulator pulls nothing: build it (dpo-localcluster images) or podman load it"
            )
        return None

    # --- podman
    def podman_env(self) -> dict[str, str]:
        """podman's environment: the project's containers.conf and storage.conf (dpo_dev.images)."""
        with self._lock:
            if self._podman_env is None:
                self._podman_env = images.podman_env()
            return self._podman_env

    def podman(
        self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args], env=self.podman_env() | (env or {}), cwd=cwd, capture_output=True, text=True
        )

    def local_image(self, image: str) -> tuple[str, dict] | None:
        """(reference, `podman image inspect` data) of the image in local storage: a preloaded name's local
        reference, else the first of local_image_refs(image) there."""
        for ref in self.local_image_refs(image):
            result = self.podman("image", "inspect", ref)
            if result.returncode == 0:
                return ref, json.loads(result.stdout)[0]
        return None

    def local_image_refs(self, image: str) -> list[str]:
        return [self.preloaded_images[image]] if image in self.preloaded_images else local_image_refs(image)

    def container_state(self, name: str) -> dict:
        """`podman inspect`'s State of a container ({} once it is gone)."""
        result = self.podman("container", "inspect", "--format={{json .State}}", name)
        return json.loads(result.stdout) if result.returncode == 0 else {}

    def remove_containers(self, names: Iterable[str]) -> None:
        """Remove containers, killing any still running (every attempt's container goes once it has ended)."""
        names = list(names)
        if names:
            self.podman("rm", "--force", "--ignore", "--time=0", *names)

    def outcome_for(self, pod: dict, container: str, restarts: int) -> Outcome | None:
        """The scripted outcome for a container, or None to run it as a process."""
        owners = pod["metadata"].get("ownerReferences") or []
        if any(o.get("kind") == "DaemonSet" for o in owners):
            return RUN_FOREVER
        with self._lock:
            rules = list(self._rules)
        for rule in rules:
            outcome = rule(pod, container, restarts)
            if outcome is not None:
                return outcome
        annotations = pod["metadata"].get("annotations") or {}
        mode = annotations.get(f"{ANNOTATION_PREFIX}mode")
        outcome = Outcome.from_annotations(annotations)
        if outcome is not None or mode in ("process", "container"):
            return outcome
        return Outcome() if self.mode == "simulate" else None

    def in_container(self, pod: dict) -> bool:
        """Whether the pod's unscripted containers run with podman: its mode annotation, else the simulator's."""
        mode = (pod["metadata"].get("annotations") or {}).get(f"{ANNOTATION_PREFIX}mode")
        return mode == "container" or (mode is None and self.mode == "container")

    def automounts_token(self, pod: dict) -> bool:
        """automountServiceAccountToken of the pod, else of its ServiceAccount (default true)."""
        spec, namespace = pod["spec"], pod["metadata"]["namespace"]
        if spec.get("automountServiceAccountToken") is not None:
            return bool(spec["automountServiceAccountToken"])
        name = _service_account(pod)
        try:
            account = self.core.read_namespaced_service_account(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                raise ContainerConfigError(f'serviceaccount "{name}" not found') from exc
            raise
        return json.loads(account.data).get("automountServiceAccountToken") is not False

    def service_account_token(self, pod: dict) -> tuple[str, int]:
        """(token, lifetime in seconds) from the TokenRequest API for the pod's ServiceAccount, as the kubelet
        requests it: bound to the pod (it dies with the pod) when the pod names its ServiceAccount. Without the
        ServiceAccount admission plugin nothing fills in "default", and the apiserver refuses to bind a token
        to a pod whose serviceAccountName differs from the token's ServiceAccount."""
        meta, name = pod["metadata"], _service_account(pod)
        bound = None
        if pod["spec"].get("serviceAccountName"):
            bound = client.V1BoundObjectReference(api_version="v1", kind="Pod", name=meta["name"], uid=meta["uid"])
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=TOKEN_EXPIRATION_S, bound_object_ref=bound)
        )
        try:
            response = self.core.create_namespaced_service_account_token(name, meta["namespace"], request)
        except ApiException as exc:  # the kubelet keeps the pod in ContainerCreating and retries
            if exc.status == 404:
                raise ContainerConfigError(f'serviceaccount "{name}" not found') from exc
            raise ContainerConfigError(f'no token for serviceaccount "{name}": {exc.body or exc.reason}') from exc
        return response.status.token, response.spec.expiration_seconds or TOKEN_EXPIRATION_S

    def needs_process(self, pod: dict) -> bool:
        return any(
            self.outcome_for(pod, c["name"], 0) is None
            for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
        )

    def entrypoint(self, image: str) -> list[str]:
        """The stand-in for an image's ENTRYPOINT: a configured mapping, else the image's name on PATH."""
        repository = image.rsplit("@", 1)[0]
        if ":" in repository.rsplit("/", 1)[-1]:
            repository = repository.rsplit(":", 1)[0]
        if repository in self.image_entrypoints:
            return list(self.image_entrypoints[repository])
        name = repository.rsplit("/", 1)[-1]
        path = os.pathsep.join([str(self.bin_dir), os.environ.get("PATH", "")])
        return [name] if name and shutil.which(name, path=path) else []

    def base_env(self, pod_name: str) -> dict[str, str]:
        """The process env under the pod's: ours minus cluster credentials, the venv's bin first on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        env["HOSTNAME"] = pod_name
        return env | self.extra_env

    def resolve_env(self, pod: dict, spec: dict, pod_ip: str) -> dict[str, str]:
        """The container's env (envFrom, then env with $(VAR) expansion), as the kubelet resolves it."""
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                ref = source["configMapRef"]
                data = self._config_data("configmap", namespace, ref["name"], ref.get("optional", False))
            else:
                ref = source["secretRef"]
                data = self._config_data("secret", namespace, ref["name"], ref.get("optional", False))
            env.update({prefix + k: v.decode(errors="replace") for k, v in (data or {}).items()})
        for var in spec.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = _expand(var.get("value", ""), env)
                continue
            value = self._env_value(pod, spec, var["valueFrom"], pod_ip)
            if value is not None:
                env[var["name"]] = value
        return env

    def _env_value(self, pod: dict, spec: dict, source: dict, pod_ip: str) -> str | None:
        namespace = pod["metadata"]["namespace"]
        for kind, key in (("configmap", "configMapKeyRef"), ("secret", "secretKeyRef")):
            if key in source:
                ref = source[key]
                data = self._config_data(kind, namespace, ref["name"], ref.get("optional", False))
                if data is None:
                    return None
                if ref["key"] not in data:
                    if ref.get("optional", False):
                        return None
                    raise ContainerConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
                return data[ref["key"]].decode(errors="replace")
        if "fieldRef" in source:
            return _field_value(pod, source["fieldRef"]["fieldPath"], self.address, pod_ip)
        if "resourceFieldRef" in source:
            return self._resource_value(pod, spec, source["resourceFieldRef"])
        raise ContainerConfigError(f"unsupported env source {sorted(source)}")

    def _resource_value(self, pod: dict, spec: dict, ref: dict) -> str:
        """limits.cpu / requests.memory ...: the container's value (node capacity when no limit), rounded up."""
        container = spec
        if ref.get("containerName"):
            container = next(c for c in pod["spec"]["containers"] if c["name"] == ref["containerName"])
        kind, _, resource = ref["resource"].partition(".")
        resources = container.get("resources") or {}
        quantity = (resources.get(kind) or {}).get(resource)
        if quantity is None and kind == "requests":
            quantity = (resources.get("limits") or {}).get(resource)
        if quantity is None:
            quantity = self.nodes[pod["spec"]["nodeName"]].capacity().get(resource, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(int((parse_quantity(quantity) / divisor).to_integral_value(rounding=ROUND_CEILING)))

    def _config_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, bytes] | None:
        """A ConfigMap's or Secret's data as bytes; None if missing and optional."""
        try:
            if kind == "secret":
                obj = self.core.read_namespaced_secret(name, namespace, _preload_content=False)
            else:
                obj = self.core.read_namespaced_config_map(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404 and optional:
                return None
            if exc.status == 404:
                raise ContainerConfigError(f'{kind} "{name}" not found') from exc
            raise
        body = json.loads(obj.data)
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (body.get("data") or {}).items()}
        data.update({k: base64.b64decode(v) for k, v in (body.get("binaryData") or {}).items()})
        return data

    def materialize_volumes(self, pod: dict, pod_dir: Path) -> dict[str, Path]:
        """Local directories standing in for the pod's volumes (PVCs persist per claim across pods)."""
        namespace = pod["metadata"]["namespace"]
        volumes: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            local = pod_dir / "volumes" / name
            if "persistentVolumeClaim" in volume:
                local = self._claim_path(namespace, volume["persistentVolumeClaim"]["claimName"])
            elif "hostPath" in volume:
                local = Path(volume["hostPath"]["path"])
            local.mkdir(parents=True, exist_ok=True)
            for kind, key in (("configmap", "configMap"), ("secret", "secret")):
                if key in volume:
                    source = volume[key]
                    ref_name = source.get("name") or source.get("secretName")
                    data = self._config_data(kind, namespace, ref_name, source.get("optional", False)) or {}
                    items = source.get("items") or [{"key": k, "path": k} for k in data]
                    for item in items:
                        if item["key"] not in data:
                            raise ContainerConfigError(f"couldn't find key {item['key']} in {kind} {ref_name}")
                        target = local / item["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(data[item["key"]])
                        target.chmod(item.get("mode", source.get("defaultMode", 0o644)))
            volumes[name] = local
        return volumes

    def own_volumes(self, pod: dict, volumes: dict[str, Path]) -> None:
        """Volume ownership as the kubelet sets it before a container starts: emptyDirs world-writable (0777);
        with an fsGroup, emptyDir, configMap, secret and claim volumes get that group (read-only for configMap
        and secret). A claim's hostPath PV stands in for a provisioned volume, which supports fsGroup; hostPath
        volumes stay as they are."""
        fs_group = (pod["spec"].get("securityContext") or {}).get("fsGroup")
        for volume in pod["spec"].get("volumes") or []:
            path = volumes.get(volume["name"])
            if path is None or "hostPath" in volume:
                continue
            if "emptyDir" in volume:
                path.chmod(0o777)
            if fs_group is not None and {"emptyDir", "configMap", "secret", "persistentVolumeClaim"} & volume.keys():
                _set_group(path, int(fs_group), writable=not {"configMap", "secret"} & volume.keys())

    def _claim_path(self, namespace: str, claim: str) -> Path:
        """Where a claim's data lives here: its bound PV's hostPath/local path, else a dir per claim."""
        try:
            volume_name = self.core.read_namespaced_persistent_volume_claim(claim, namespace).spec.volume_name
            if volume_name:
                volume = self.core.read_persistent_volume(volume_name).spec
                source = volume.host_path or volume.local
                if source is not None:
                    return Path(source.path)
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise ContainerConfigError(f'persistentvolumeclaim "{claim}" not found') from exc
        return self.workdir / "pvcs" / namespace / claim

    # --- threads
    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _node_body(self, node: NodeSpec) -> dict:
        labels = {
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "nodesim",
            **node.labels,
        }
        return {
            "metadata": {"name": node.name, "labels": labels, "annotations": {"node.alpha.kubernetes.io/ttl": "0"}},
            "spec": {"taints": node.taints or None},
        }

    def _node_status(self, node: NodeSpec, full: bool) -> dict:
        now = _now()
        since = self._registered_at.setdefault(node.name, now)
        conditions = [
            {"type": kind, "status": "False", "reason": f"KubeletHas{ok}", "lastHeartbeatTime": now}
            for kind, ok in (
                ("MemoryPressure", "SufficientMemory"),
                ("DiskPressure", "NoDiskPressure"),
                ("PIDPressure", "SufficientPID"),
            )
        ]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": now})
        for condition in conditions:
            condition["lastTransitionTime"] = since
        status: dict[str, Any] = {"conditions": conditions}
        if full:
            status.update(
                capacity=node.capacity(),
                allocatable=node.capacity(),
                addresses=[{"type": "InternalIP", "address": self.address}, {"type": "Hostname", "address": node.name}],
                daemonEndpoints={"kubeletEndpoint": {"Port": self.kubelet_port}},
                nodeInfo={
                    "machineID": node.name,
                    "systemUUID": node.name,
                    "bootID": uuid.uuid4().hex,
                    "kernelVersion": os.uname().release,
                    "osImage": "nodesim",
                    "containerRuntimeVersion": "nodesim://1",
                    "kubeletVersion": KUBELET_VERSION,
                    "kubeProxyVersion": KUBELET_VERSION,
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            )
        return {"status": status}

    def _register(self, node: NodeSpec) -> None:
        body = self._node_body(node)
        try:
            self.core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core.patch_node(node.name, body, _content_type="application/merge-patch+json")
        self.core.patch_node_status(
            node.name, self._node_status(node, full=True), _content_type="application/merge-patch+json"
        )
        self._renew_lease(node)

    def _renew_lease(self, node: NodeSpec) -> None:
        coordination = client.CoordinationV1Api(self.api)
        spec = {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": _now_micro()}
        try:
            coordination.patch_namespaced_lease(
                node.name, "kube-node-lease", {"spec": spec}, _content_type="application/merge-patch+json"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            uid = self.core.read_node(node.name).metadata.uid
            owner = {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": uid}
            body = {"metadata": {"name": node.name, "ownerReferences": [owner]}, "spec": spec}
            with contextlib.suppress(ApiException):
                coordination.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat(self) -> None:
        """Keep Leases and Ready conditions fresh so nodelifecycle never taints or evicts the fake nodes."""
        while not self._stopping.wait(self.heartbeat_s):
            for node in self.nodes.values():
                try:
                    self._renew_lease(node)
                    self.core.patch_node_status(
                        node.name, self._node_status(node, full=False), _content_type="application/merge-patch+json"
                    )
                except ApiException as exc:
                    if exc.status == 404:  # someone deleted the Node: re-register, as a kubelet does
                        with contextlib.suppress(ApiException, OSError):
                            self._register(node)
                    else:
                        log.warning("nodesim: heartbeat for %s failed: %s", node.name, exc)
                except OSError as exc:
                    if not self._stopping.is_set():
                        log.warning("nodesim: heartbeat for %s failed: %s", node.name, exc)

    def _wait_schedulable(self, timeout: float) -> None:
        """nodelifecycle lifts the not-ready taint (added at creation) once it sees the Ready heartbeat."""
        deadline = time.monotonic() + timeout
        while True:
            tainted = [
                n.metadata.name
                for n in (self.core.read_node(name) for name in self.nodes)
                if any(t.key == NOT_READY_TAINT for t in n.spec.taints or [])
            ]
            if not tainted:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {tainted} still carry the {NOT_READY_TAINT} taint after {timeout:.0f}s")
            time.sleep(0.2)

    def _watch(self, list_call: Callable[..., Any], handle: Callable[[str, dict], None], **selectors: str) -> None:
        """List+watch with resourceVersion resume; relist on 410 Gone (reporting vanished objects as DELETED)."""
        version: str | None = None
        known: dict[str, dict] = {}
        while not self._stopping.is_set():
            try:
                if version is None:
                    body = json.loads(list_call(**selectors, _preload_content=False).data)
                    version = body["metadata"]["resourceVersion"]
                    listed = {o["metadata"]["uid"]: o for o in body["items"]}
                    for uid, obj in known.items():
                        if uid not in listed:
                            handle("DELETED", obj)
                    known = listed
                    for obj in listed.values():
                        handle("ADDED", obj)
                response = list_call(
                    **selectors,
                    watch=True,
                    resource_version=version,
                    allow_watch_bookmarks=True,
                    timeout_seconds=300,
                    _preload_content=False,
                )
                self._watch_responses.add(response)
                try:
                    for line in iter_resp_lines(response):
                        event = json.loads(line) if line else None
                        if event is None:
                            continue
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            if obj.get("code") == 410:
                                version = None
                                break
                            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "BOOKMARK":
                            continue
                        if event["type"] == "DELETED":
                            known.pop(obj["metadata"]["uid"], None)
                        else:
                            known[obj["metadata"]["uid"]] = obj
                        handle(event["type"], obj)
                finally:
                    self._watch_responses.discard(response)
                    response.release_conn()
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                elif not self._stopping.is_set():
                    log.warning("nodesim: watch failed: %s", exc)
                    self._stopping.wait(1.0)
            except Exception as exc:
                if self._stopping.is_set():
                    return
                log.warning("nodesim: watch interrupted: %s", exc)
                self._stopping.wait(1.0)

    def _watch_pods(self) -> None:
        self._watch(self.core.list_pod_for_all_namespaces, self._on_pod, field_selector="spec.nodeName!=")

    def _watch_claims(self) -> None:
        self._watch(self.core.list_persistent_volume_claim_for_all_namespaces, self._on_claim)

    def _on_claim(self, kind: str, claim: dict) -> None:
        """Provision a hostPath PV for each unbound claim without a StorageClass (the clusters we start have
        no provisioner); the PV controller binds it, so the scheduler accepts pods that use the claim."""
        meta, spec = claim["metadata"], claim["spec"]
        name = f"nodesim-pv-{meta['uid']}"
        if kind == "DELETED":
            with contextlib.suppress(ApiException):
                self.core.delete_persistent_volume(name)
            shutil.rmtree(self.workdir / "pvcs" / meta["uid"], ignore_errors=True)
            return
        if spec.get("volumeName") or spec.get("storageClassName") or meta.get("deletionTimestamp"):
            return
        path = self.workdir / "pvcs" / meta["uid"]
        path.mkdir(parents=True, exist_ok=True)
        volume = {
            "metadata": {"name": name, "labels": {f"{ANNOTATION_PREFIX}provisioned": "true"}},
            "spec": {
                "capacity": {"storage": (spec.get("resources") or {}).get("requests", {}).get("storage", "1Gi")},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                **({"volumeMode": spec["volumeMode"]} if spec.get("volumeMode") else {}),
            },
        }
        try:
            self.core.create_persistent_volume(volume)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("nodesim: cannot provision a volume for claim %s: %s", meta["name"], exc)

    def _on_pod(self, kind: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if spec.get("nodeName") not in self.nodes:
            return
        uid = meta["uid"]
        with self._lock:
            runner = self._runners.get(uid)
            if kind == "DELETED":
                self._runners.pop(uid, None)
                self._deleting.discard(uid)
                self._pod_ips.pop(uid, None)
                if runner and self._by_name.get((meta["namespace"], meta["name"])) is runner:
                    del self._by_name[(meta["namespace"], meta["name"])]
            elif meta.get("deletionTimestamp"):
                if uid in self._deleting:
                    return
                self._deleting.add(uid)
            elif runner is None and pod.get("status", {}).get("phase", "Pending") == "Pending":
                runner = _PodRunner(self, pod, self._allocate_pod_ip(pod))
                self._runners[uid] = self._by_name[(meta["namespace"], meta["name"])] = runner
                runner.start()
                return
            else:
                return
        if kind == "DELETED":
            if runner is not None:
                threading.Thread(target=self._forget, args=(runner,), daemon=True).start()
            return
        grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.max_grace_s)
        threading.Thread(target=self._finish_deletion, args=(runner, pod, grace), daemon=True).start()

    def _allocate_pod_ip(self, pod: dict) -> str:
        """A loopback address no other pod of ours has (the caller holds the lock), so pods may bind the same
        port, as with a CNI; host-network pods use the node's address."""
        if pod["spec"].get("hostNetwork"):
            return self.address
        used = set(self._pod_ips.values())
        for _ in range(POD_NETWORK_SIZE):
            index, self._next_pod_ip = self._next_pod_ip, (self._next_pod_ip + 1) % POD_NETWORK_SIZE
            ip = f"{POD_NETWORK}.{index // 254}.{index % 254 + 1}"
            if ip not in used:
                self._pod_ips[pod["metadata"]["uid"]] = ip
                return ip
        raise RuntimeError(f"all {POD_NETWORK_SIZE} pod IPs are in use")

    def _finish_deletion(self, runner: _PodRunner | None, pod: dict, grace: float) -> None:
        """No kubelet confirms the deletion, so after killing the containers we delete with grace 0."""
        meta = pod["metadata"]
        if runner is not None:
            runner.kill(grace)
        options = client.V1DeleteOptions(grace_period_seconds=0, preconditions=client.V1Preconditions(uid=meta["uid"]))
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=options, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("nodesim: deleting %s/%s failed: %s", meta["namespace"], meta["name"], exc)

    @staticmethod
    def _forget(runner: _PodRunner) -> None:
        runner.kill(0)
        shutil.rmtree(runner.dir, ignore_errors=True)


def _service_account(pod: dict) -> str:
    return pod["spec"].get("serviceAccountName") or "default"


def _field_value(pod: dict, path: str, host_ip: str, pod_ip: str) -> str:
    """The downward-API fields a container env may reference."""
    meta, spec = pod["metadata"], pod["spec"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": host_ip,
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
    }
    if path not in values:
        raise ContainerConfigError(f"unsupported fieldRef {path}")
    return values[path]


def parse_node(text: str) -> NodeSpec:
    """``NAME[:key=value,...]`` with keys gpus, cpu, memory, pods, label.K=V, taint.K=V:Effect (CLI form)."""
    name, _, options = text.partition(":")
    node = NodeSpec(name=name)
    for option in filter(None, options.split(",")):
        key, _, value = option.partition("=")
        if key == "gpus":
            node.gpus = int(value)
        elif key in ("cpu", "memory"):
            setattr(node, key, value)
        elif key == "pods":
            node.pods = int(value)
        elif key.startswith("label."):
            node.labels[key[len("label.") :]] = value
        elif key.startswith("taint."):
            taint_value, _, effect = value.partition(":")
            node.taints.append({"key": key[len("taint.") :], "value": taint_value, "effect": effect or "NoSchedule"})
        else:
            raise ValueError(f"unknown node option {key!r} in {text!r}")
    return node
