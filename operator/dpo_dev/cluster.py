"""A real Kubernetes control plane on the local machine, from binaries built from Debian's sources (build.py).

Why: an operator is only as trustworthy as the API server it was tested against (structural schemas, RBAC,
status subresource, finalizers, garbage collection, the Job controller, the scheduler).

Public API:
    * :class:`LocalCluster` - start/stop the control plane by PID, admin kubeconfig, readiness waits, an
      opt-in audit log of chosen users' requests.
    * :func:`write_sa_kubeconfig` - a kubeconfig for a ServiceAccount (TokenRequest), for any cluster.
    * :func:`stop_state` - stop a cluster recorded in a state file by another process (``dpo-localcluster down``).
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from .build import Binaries, Progress, StepError, _quiet, _run_step, ensure_binaries
from .processes import free_ports, kill_pid, spawn, terminate

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


# --- PKI and kubeconfigs -----------------------------------------------------------------------------


def _make_pki(pki: Path, log: Path) -> None:
    """A CA, an apiserver serving cert for 127.0.0.1/localhost/kubernetes.default, and a SA signing key."""
    pki.mkdir(parents=True, exist_ok=True)
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    (pki / "server.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectAltName=IP:127.0.0.1,DNS:localhost,IP:10.0.0.1,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
    )
    for command in (
        f"req -x509 {ec} -keyout ca.key -out ca.crt -days 3650 -subj /CN=dpo-local-ca",
        f"req {ec} -keyout apiserver.key -out apiserver.csr -subj /CN=kube-apiserver",
        "x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt -days 3650"
        " -extfile server.ext",
        "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key",
        "pkey -in sa.key -pubout -out sa.pub",
    ):
        _run_step("pki", ["openssl", *command.split()], log, cwd=pki)


def kubeconfig_dict(server: str, ca_pem: bytes | None, token: str, user: str, insecure: bool = False) -> dict:
    """A one-context kubeconfig authenticating with a bearer token."""
    cluster: dict[str, Any] = {"server": server}
    if ca_pem:
        cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cluster", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "cluster", "user": user}}],
        "current-context": user,
    }


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def write_sa_kubeconfig(
    admin_kubeconfig: Path,
    namespace: str,
    name: str,
    path: Path,
    *,
    expiration_seconds: int = 86400,
    create: bool = True,
) -> Path:
    """Write a kubeconfig for ServiceAccount ``namespace/name`` (creating both when ``create``).

    The token comes from the TokenRequest API, so this works on any cluster >= 1.20 (what
    ``kubectl create token`` does); the cluster entry (server, CA) is copied from the admin kubeconfig.
    """
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    with config.new_client_from_config(config_file=str(admin_kubeconfig)) as api_client:
        core = client.CoreV1Api(api_client)
        if create:
            for create_call in (
                lambda: core.create_namespace({"metadata": {"name": namespace}}),
                lambda: core.create_namespaced_service_account(namespace, {"metadata": {"name": name}}),
            ):
                try:
                    create_call()
                except ApiException as exc:
                    if exc.status != 409:
                        raise
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        token = core.create_namespaced_service_account_token(name, namespace, request).status.token
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c["context"] for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    ca_pem = None
    if "certificate-authority-data" in cluster:
        ca_pem = base64.b64decode(cluster["certificate-authority-data"])
    elif "certificate-authority" in cluster:
        ca_pem = Path(cluster["certificate-authority"]).read_bytes()
    kubeconfig = kubeconfig_dict(
        cluster["server"], ca_pem, token, f"system:serviceaccount:{namespace}:{name}",
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
    )  # fmt: skip
    return _write_private(path, yaml.safe_dump(kubeconfig))


# --- the control plane -------------------------------------------------------------------------------

_live_clusters: set[LocalCluster] = set()
_live_lock = threading.Lock()


def _stop_live_clusters() -> None:
    """atexit: whatever the caller forgot (or an exception skipped), stop it."""
    for cluster in list(_live_clusters):
        cluster.stop()


def _sigterm_to_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _install_exit_handlers() -> None:
    """Make SIGTERM run atexit handlers (Ctrl-C already does, via KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        None,
    ):
        signal.signal(signal.SIGTERM, _sigterm_to_exit)


atexit.register(_stop_live_clusters)


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler as local child processes.

    Usage::

        with LocalCluster() as cluster:           # builds on first use (cached), then ~5 s to ready
            subprocess.run(["kubectl", "--kubeconfig", cluster.kubeconfig, "get", "ns"])

    Ports are picked free per instance, so clusters never collide; everything runs from ``workdir``
    (a fresh temporary dir unless given) and is stopped by PID on :meth:`stop`, at exit, on SIGTERM,
    or (via PR_SET_PDEATHSIG) when the starting process dies.

    ``audit_users`` (user names as the API server sees them, e.g. ``system:serviceaccount:NS:NAME``) turns on
    the API server's audit log for those users only (:attr:`audit_log`): a record of their requests that costs
    them no hop (no proxy) and other clients nothing at all.
    """

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        binaries: Binaries | None = None,
        cache: Path | None = None,
        progress: Progress = _quiet,
        verbosity: int = 1,
        audit_users: Sequence[str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="dpo-localcluster-"))
        self._binaries = binaries
        self._cache = cache
        self._progress = progress
        self._verbosity = verbosity
        self._procs: dict[str, subprocess.Popen] = {}
        self.token = secrets.token_hex(24)
        self.ports: dict[str, int] = {}
        self.audit_users = list(audit_users) if audit_users else None

    # --- audit
    @property
    def audit_log(self) -> Path | None:
        """The API server's audit log (JSON lines, audit.k8s.io/v1 Events), None unless ``audit_users`` is set.

        Only requests of ``audit_users`` are recorded, at level Metadata (who, verb, objectRef, requestURI,
        response code; no bodies). Every request logs ResponseComplete when it ends; a long-running one also
        logs when it opens: a log stream (pods/log, exec, ...) its ResponseStarted, a watch its RequestReceived.
        (This API server, 1.20, bypasses the audit filter's response writer for watches (``httplog.Unlogged`` in
        the watch handler), so a watch's ResponseStarted would only be logged, faked, when it ends.) Blocking
        mode: each event is written synchronously by the request's own handler, none is dropped or buffered.
        """
        return self.workdir / "audit.log" if self.audit_users else None

    def _audit_flags(self) -> list[str]:
        """kube-apiserver flags for the audit log (none without ``audit_users``); writes the policy."""
        if not self.audit_users:
            return []
        users = self.audit_users
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            # Stages are omitted per rule: the policy-wide list would be added to every rule's.
            "rules": [
                {"level": "Metadata", "users": users, "verbs": ["watch"], "omitStages": ["ResponseStarted"]},
                {"level": "Metadata", "users": users, "omitStages": ["RequestReceived"]},
                {"level": "None"},
            ],
        }
        policy_file = self.workdir / "audit-policy.yaml"
        policy_file.write_text(yaml.safe_dump(policy))
        assert self.audit_log is not None
        for old in self.workdir.glob("audit*.log"):  # a reused workdir: start from an empty log
            old.unlink()
        return [
            f"--audit-policy-file={policy_file}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=blocking",  # written synchronously: nothing dropped, nothing delayed in a buffer
            "--audit-log-maxsize=1000000",  # MB: never rotated (lumberjack's default would rotate at 100 MB)
        ]

    # --- paths and clients
    @property
    def kubeconfig(self) -> Path:
        """The admin (system:masters) kubeconfig."""
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def log(self, component: str) -> Path:
        """The log file of a component (etcd, kube-apiserver, ...)."""
        return self.workdir / "logs" / f"{component}.log"

    def pids(self) -> dict[str, int]:
        """PIDs of the components started (alive or not)."""
        return {name: proc.pid for name, proc in self._procs.items()}

    def api_client(self) -> Any:
        """A kubernetes.client.ApiClient for the admin kubeconfig (caller closes it)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def sa_kubeconfig(self, namespace: str, name: str, path: Path | None = None) -> Path:
        """A kubeconfig for ServiceAccount ``namespace/name`` (created if missing)."""
        path = path or self.workdir / "kubeconfigs" / f"{namespace}.{name}.kubeconfig"
        return write_sa_kubeconfig(self.kubeconfig, namespace, name, path)

    def state(self) -> dict[str, Any]:
        """What another process needs to use or stop this cluster (see :func:`stop_state`)."""
        assert self._binaries is not None
        binaries = {
            "etcd": self._binaries.etcd,
            "kube-apiserver": self._binaries.apiserver,
            "kube-controller-manager": self._binaries.controller_manager,
            "kube-scheduler": self._binaries.scheduler,
        }
        return {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "workdir": str(self.workdir),
            "ports": self.ports,
            "processes": {n: {"pid": p.pid, "executable": str(binaries[n])} for n, p in self._procs.items()},
        }

    # --- lifecycle
    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start all components and wait until each is healthy; on failure stop what started and raise."""
        if self._procs:
            return self
        binaries = self._binaries = self._binaries or ensure_binaries(self._cache, self._progress)
        _install_exit_handlers()
        with _live_lock:
            _live_clusters.add(self)
        try:
            self._start(binaries, timeout)
        except BaseException:
            self.stop(remove_workdir=False)
            raise
        return self

    def _start(self, binaries: Binaries, timeout: float) -> None:
        work, pki = self.workdir, self.workdir / "pki"
        for sub in ("etcd", "logs"):
            shutil.rmtree(work / sub, ignore_errors=True)
        self._progress("generating certificates")
        _make_pki(pki, self.log("pki"))
        names = ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        _write_private(work / "tokens.csv", f"{self.token},admin,admin,system:masters\n")
        ca_pem = self.ca_file.read_bytes()
        _write_private(self.kubeconfig, yaml.safe_dump(kubeconfig_dict(self.server, ca_pem, self.token, "admin")))
        v = f"--v={self._verbosity}"

        etcd_url = f"http://127.0.0.1:{self.ports['etcd']}"
        peer_url = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        self._spawn(
            "etcd",
            [
                str(binaries.etcd),
                "--name=default",
                f"--data-dir={work / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--logger=zap",
                "--log-level=warn",
                # One member: no peers to wait for, so elect at once (the 1 s default costs a second per start).
                "--heartbeat-interval=10",
                "--election-timeout=100",
            ],
        )
        self._progress("waiting for etcd")
        self._wait("etcd", f"{etcd_url}/health", timeout, lambda body: b'"health":"true"' in body)

        self._spawn(
            "kube-apiserver",
            [
                str(binaries.apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.ports['apiserver']}",
                "--insecure-port=0",
                f"--cert-dir={pki}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--token-auth-file={work / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                # No token controller runs, so the ServiceAccount admission plugin would reject pods.
                "--disable-admission-plugins=ServiceAccount",
                # 127.0.0.1 is not a valid Endpoints address, so don't reconcile the kubernetes service.
                "--endpoint-reconciler-type=none",
                # The node simulator advertises 127.0.0.1 + its HTTPS port; logs are proxied there.
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=true",
                "--profiling=false",
                *self._audit_flags(),
                v,
            ],
        )
        self._progress("waiting for kube-apiserver")
        self._wait("kube-apiserver", f"{self.server}/readyz", timeout, lambda body: body.strip() == b"ok")

        common = [
            f"--kubeconfig={self.kubeconfig}",
            "--leader-elect=false",  # one instance; skips the lease wait at start
            "--port=0",  # no insecure port (its fixed default would collide between clusters)
            "--bind-address=127.0.0.1",
            "--profiling=false",
            v,
        ]
        self._spawn(
            "kube-controller-manager",
            [
                str(binaries.controller_manager),
                *common,
                f"--secure-port={self.ports['controller-manager']}",
                f"--cert-dir={work / 'controller-manager'}",
                f"--root-ca-file={self.ca_file}",
                # nodelifecycle stays on (it lifts the not-ready taint); the simulator renews node Leases.
                "--node-monitor-period=2s",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(binaries.scheduler),
                *common,
                f"--secure-port={self.ports['scheduler']}",
                f"--cert-dir={work / 'scheduler'}",
            ],
        )
        self._progress("waiting for kube-controller-manager and kube-scheduler")
        for name, port in (("kube-controller-manager", "controller-manager"), ("kube-scheduler", "scheduler")):
            url = f"https://127.0.0.1:{self.ports[port]}/healthz"
            self._wait(name, url, timeout, lambda body: body.strip() == b"ok")

    def _spawn(self, name: str, argv: list[str]) -> None:
        try:
            self._procs[name] = spawn(argv, self.log(name), cwd=self.workdir)
        except OSError as exc:
            raise StepError(f"start {name}", str(exc), self.log(name)) from exc

    def _wait(self, name: str, url: str, timeout: float, ok: Callable[[bytes], bool]) -> None:
        """Poll a health URL until ``ok``; fail fast (with the log tail) if the process exits."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if not url.startswith(self.server):  # controller-manager/scheduler serve self-signed certs
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise StepError(f"start {name}", f"exited with status {proc.returncode}", self.log(name))
            try:
                with urllib.request.urlopen(request, timeout=5, context=context) as response:
                    body = response.read()
                if ok(body):
                    return
                last = body.decode(errors="replace")[-500:]
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise StepError(f"start {name}", f"not ready after {timeout:.0f}s ({url}: {last})", self.log(name))
            time.sleep(0.2)

    def stop(self, remove_workdir: bool = True) -> None:
        """Stop every component by PID (the data is disposable: no long graceful drain); remove the workdir
        if we created it."""
        terminate(list(self._procs.values()))
        with _live_lock:
            _live_clusters.discard(self)
        if remove_workdir and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif remove_workdir:  # a kept workdir keeps its logs, not the 60 MB of throwaway etcd data
            shutil.rmtree(self.workdir / "etcd", ignore_errors=True)


def stop_state(state: dict[str, Any]) -> None:
    """Stop the processes recorded by :meth:`LocalCluster.state` (from another process)."""
    for proc in reversed(list(state.get("processes", {}).values())):
        kill_pid(int(proc["pid"]), proc["executable"])


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a JSON state file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, path)
