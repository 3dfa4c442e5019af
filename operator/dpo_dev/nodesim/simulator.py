"""The node simulator itself: it serves the kubelet endpoint, registers the nodes, watches the pods bound to them
(a runner per pod), deletes terminating pods (no kubelet confirms it), allocates pod IPs, and provisions hostPath
PVs for claims without a StorageClass."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from .. import images
from ..processes import processes_in_groups
from .kubelet import _KubeletHandler, _self_signed_cert, _TLSServer
from .model import ANNOTATION_PREFIX, RUN_FOREVER, NodeSimConfig, NodeSpec, Outcome, Rule
from .nodes import NodeRegistry
from .podman import SIMULATOR_LABEL, _PodmanWait, check_podman, local_image_refs
from .pods import PodResolver
from .runner import _PodRunner

log = logging.getLogger(__name__)

POD_NETWORK, POD_NETWORK_SIZE = "127.77", 256 * 254  # pod IPs 127.77.x.y: all of 127.0.0.0/8 is local on Linux


class NodeSimulator:
    """Fake Nodes plus a kubelet stand-in, running in threads of this process.

    Usage::

        sim = NodeSimulator(kubeconfig, [NodeSpec("gpu-0", gpus=2)], config=NodeSimConfig(mode="process")).start()
        with sim.scripted(lambda pod, container, restarts: Outcome(exit_code=1, reason="OOMKilled")):
            ...  # pods now simulate an OOM kill
        sim.stop()

    Per pod, the first match decides how a container runs: a DaemonSet pod is simulated running forever;
    then the scripted rules (newest first); then annotations (``nodesim.dpo.dev/mode:
    process|simulate|container``, ``nodesim.dpo.dev/{exit-code,duration,reason,message,logs}``); then the
    configured ``mode``.
    """

    def __init__(
        self, kubeconfig: Path | str, nodes: Sequence[NodeSpec], *, config: NodeSimConfig | None = None
    ) -> None:
        self.kubeconfig = Path(kubeconfig)
        self.nodes = {n.name: n for n in nodes}
        self.config = config or NodeSimConfig()  # backoffs, grace, mode: read as pods run (a test may replace it)
        self._own_workdir = self.config.workdir is None
        self.workdir = self.config.workdir or Path(tempfile.mkdtemp(prefix="dpo-nodesim-"))
        self._rules: list[Rule] = []
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
        self.resolver: PodResolver  # what the pods refer to in the API (set by start())
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
        if self.config.mode == "container":  # fail here, not pod by pod
            check_podman(self.podman_env())
        configuration = client.Configuration()
        kube_config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
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
        self.resolver = PodResolver(self.core, self.nodes, self.config.address, self.workdir)
        cert, key = _self_signed_cert(self.workdir / "tls", self.config.address)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._server = _TLSServer((self.config.address, 0), _KubeletHandler, context, self)
        self._thread(self._server.serve_forever, "nodesim-kubelet")
        try:
            registry = NodeRegistry(self.api, self.nodes, self.config.address, self.kubelet_port)
            for node in self.nodes.values():
                registry.register(node)
            self._thread(lambda: registry.heartbeat(self._stopping, self.config.heartbeat_s), "nodesim-heartbeat")
            self._thread(self._watch_pods, "nodesim-watch-pods")
            if self.config.provision_volumes:
                self._thread(self._watch_claims, "nodesim-watch-claims")
            registry.wait_schedulable(timeout)
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
        if self.config.delete_nodes_on_stop and self.api is not None:
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
        if any(marker in image for marker in self.config.pull_error_markers):
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
        preloaded = self.config.preloaded_images
        return [preloaded[image]] if image in preloaded else local_image_refs(image)

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
        return Outcome() if self.config.mode == "simulate" else None

    def in_container(self, pod: dict) -> bool:
        """Whether the pod's unscripted containers run with podman: its mode annotation, else the simulator's."""
        mode = (pod["metadata"].get("annotations") or {}).get(f"{ANNOTATION_PREFIX}mode")
        return mode == "container" or (mode is None and self.config.mode == "container")

    def needs_process(self, pod: dict) -> bool:
        return any(
            self.outcome_for(pod, c["name"], 0) is None
            for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
        )

    def _thread(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

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
        grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.config.max_grace_s)
        threading.Thread(target=self._finish_deletion, args=(runner, pod, grace), daemon=True).start()

    def _allocate_pod_ip(self, pod: dict) -> str:
        """A loopback address no other pod of ours has (the caller holds the lock), so pods may bind the same
        port, as with a CNI; host-network pods use the node's address."""
        if pod["spec"].get("hostNetwork"):
            return self.config.address
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
