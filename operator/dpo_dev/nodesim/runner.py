"""One pod's life on a simulated node, as a kubelet plays it: init containers in order, then the containers in
parallel, restarts per restartPolicy with CrashLoopBackOff, probes, the projected service-account token, and the
pod status it reports. A container runs scripted (simulate mode, here), as a process (process.py) or with podman
(podman.py)."""

from __future__ import annotations

import http.client
import logging
import math
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kubernetes.client.rest import ApiException

from .logs import TERMINATION_MESSAGE_MAX, LogFile
from .model import ContainerConfigError, Outcome, _now
from .podman import run_container
from .pods import own_volumes
from .process import run_process

if TYPE_CHECKING:
    from .simulator import NodeSimulator

log = logging.getLogger(__name__)

TOKEN_REFRESH_AT = 0.8  # the kubelet renews a token after 80% of its lifetime
PROBE_DEFAULTS = {  # Kubernetes' defaults
    "initialDelaySeconds": 0,
    "periodSeconds": 10,
    "timeoutSeconds": 1,
    "successThreshold": 1,
    "failureThreshold": 3,
}


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
        self.volumes: dict[str, Path] = {}
        self.token_dir: Path | None = None  # the projected service-account files, when the pod gets them
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
                "hostIP": self.sim.config.address,
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
        if self.token_dir is not None:
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
        if self.stopping.wait(self.sim.config.pull_backoff_s):
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
                self.volumes = self.sim.resolver.materialize_volumes(self.pod, self.dir)
                if self.in_container:
                    own_volumes(self.pod, self.volumes)
                for container in self.init_containers + self.containers:
                    self.sim.resolver.resolve_env(self.pod, container.spec, self.ip)
                if self.sim.resolver.automounts_token(self.pod):
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
        token, lifetime = self.sim.resolver.service_account_token(self.pod)
        directory = self.dir / "kubernetes.io~serviceaccount"  # no container dir can have this name
        directory.mkdir(parents=True, exist_ok=True)
        # A non-root image must read it: 0644 is the defaultMode of the kube-api-access volume Kubernetes adds.
        for name, data, mode in (
            ("ca.crt", self.sim.ca_pem, 0o644),
            ("namespace", self.namespace.encode(), 0o644),
            ("token", token.encode(), 0o644 if self.in_container else 0o600),
        ):
            _write_atomically(directory / name, data, mode)
        self.token_dir, self._token_refresh_at = directory, requested + TOKEN_REFRESH_AT * lifetime

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
        backoff = self.sim.config.restart_backoff_s
        while not self.stopping.is_set():
            logfile = LogFile(self.dir / container.name / f"{container.restart_count}.log")
            container.container_id = f"nodesim://{uuid.uuid4().hex}"
            outcome = self.sim.outcome_for(self.pod, container.name, container.restart_count)
            probed = outcome is None and not container.init  # probes run for process- and container-mode ones
            container.started = not (probed and "startupProbe" in container.spec)
            container.ready = container.started and not (probed and "readinessProbe" in container.spec)
            if outcome is not None or not self.in_container:  # a container runs once podman has started it
                self.show_running(container, logfile, _now())
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
            backoff = min(backoff * 2, self.sim.config.max_restart_backoff_s)
            container.restart_count += 1
        return 137

    def show_running(self, container: _Container, logfile: LogFile, started_at: str) -> None:
        """The attempt has started: its log becomes readable and the status says running."""
        container.logs.append(logfile)
        container.state = {"running": {"startedAt": started_at}}
        self.report()

    def _execute(self, container: _Container, logfile: LogFile, outcome: Outcome | None) -> tuple[int, str | None, str]:
        if outcome is not None:
            return self._simulate(outcome, logfile)
        try:
            return (
                run_container(self, container, logfile) if self.in_container else run_process(self, container, logfile)
            )
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

    def add_process(self, proc: subprocess.Popen) -> None:
        self.sim.track(proc)
        self.processes.append(proc)
        if self.stopping.is_set():  # deletion raced the start
            self.sim.kill_group(proc, 0)

    def supervise(self, container: _Container, proc: subprocess.Popen, wait: Callable[[], int]) -> int:
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
        self.sim.kill_group(proc, min(grace, self.sim.config.max_grace_s))
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
