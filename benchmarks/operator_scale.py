"""Operator scale: how fast the operator turns N DPOJobs into trainer Jobs against a bare client doing the same
writes, what it costs in memory and API requests, and how fast trainer metrics reach status.

    .venv/bin/python benchmarks/operator_scale.py --count 1000 --running 200

(`--count 50 --running 30` takes about 2 minutes on a 2-core machine.) On the local control plane
(dpo_dev.cluster.LocalCluster), with the operator as a local process under its ServiceAccount (resync as the
chart's default, 30 s) talking straight to the API server, as the baseline's client does. The operator's
requests are counted from the API server's audit log (LocalCluster(audit_users=...)): only the operator's user
(system:serviceaccount:<its namespace>:<its account>) is audited, at level Metadata, so nothing stands between
the operator and the API server and the baseline's requests cost nothing extra. They are named as
dpo_dev.api_proxy names them ("PATCH dpojobs/status", "WATCH pods", "GET pods/log", "GET /version"); a watch or
a log stream counts once, when it opens, any other request when it completes.

1. baseline: before the operator starts, a bare kubernetes client writes what the operator writes per DPOJob,
   the DPOJob, its ConfigMap and its Job (built by dpo_operator.manifests), from --threads threads; time for N.
   Its namespace is deleted (and gone) before the operator starts.
2. operator: the same threaded client creates N DPOJobs only. Measured: first DPOJob submitted -> last trainer
   Job exists (a watch in this process), and its ratio to (1); per DPOJob the delay DPOJob -> Job from the
   server's creationTimestamps (1 s resolution) and from this process's watch arrival times (sub-second), and
   DPOJob -> its first status (the first watch event of it with status.phase set, on the same DPOJob watch;
   the phase waits for every DPOJob's first status before it settles); the operator's RSS (VmRSS, VmHWM) and
   CPU time; its API requests per DPOJob by verb and resource (the audit log), up to the last Job and up to
   quiescence (no request but watches/log streams for --quiet-seconds).
   The trainer pods ask for a GPU and stay Pending: no node has one.
3. metric lag (--running M > 0): a simulated node (dpo_dev.nodesim, simulate mode) runs the pods of M more
   DPOJobs forever, and this process appends a progress line to each pod's container log (the simulator's
   LogFile of that container) every --line-interval seconds, staggered, as the trainer's stdout would:
   a dpojob_api.progress.StageLog of the dpo stage (step k, its rewards/accuracies), the trainer's own model.
   The simulator serves that log to the API server's log stream (``kubectl logs -f``), so the operator reads it
   exactly as from a kubelet. Lag of a
   line = its write -> the first DPOJob watch event whose status.progress.step and status.metrics reflect it;
   p50/p95/max over the lines written in a --lag-seconds window that starts once every DPOJob's status shows
   its first line.

4. restart (--restart): the operator SIGKILLed and started again with everything of the earlier phases in
   place: until it is ready and has reconciled every DPOJob; the new process's peak RSS against the chart's
   memory limit (charts/dpo-operator/values.yaml), and its requests.

Prints a Markdown table and writes every number as JSON (--json). Everything it starts (operator, simulator,
control plane) is stopped at the end, also on failure (its work dir, with the logs and the audit log, is then
kept).
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import os
import queue
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.watch.watch import iter_resp_lines

from dpo_dev.audit import AuditCounter
from dpo_dev.cluster import LocalCluster, write_sa_kubeconfig
from dpo_dev.nodesim import RUN_FOREVER, NodeSimConfig, NodeSimulator, NodeSpec
from dpo_dev.stack import OPERATOR_ACCOUNT, OPERATOR_NAMESPACE, OperatorProcess, install, kubectl
from dpo_operator import manifests
from dpojob_api.progress import StageLog
from dpojob_api.spec import API_GROUP, API_VERSION, PLURAL, DPOJobSpec
from dpojob_api.vocabulary import Stage

REPO_ROOT = Path(__file__).resolve().parents[1]
BASELINE_NS, OPERATOR_NS, LAG_NS = "bench-baseline", "bench-operator", "bench-lag"
TOTAL_STEPS = 1_000_000
OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_ACCOUNT}"
"""Who the API server sees when the operator (under its ServiceAccount's token) calls: the one audited user."""
STREAMS = ("WATCH", "GET pods/log")
"""Long-lived requests: counted when opened, and not activity for the quiescence test."""


# --- small helpers ----------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = round(int(rest.split()[0]) / 1024, 1)
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (position - low), 3)


def summary(values: list[float], *quantiles: float) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(values)}
    for q in quantiles:
        out[f"p{q:g}"] = percentile(values, q)
    out["max"] = round(max(values), 3) if values else None
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api_client(kubeconfig: Path, pool: int = 16) -> client.ApiClient:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = pool
    return client.ApiClient(configuration)


def server_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def dpojob(namespace: str, name: str, index: int, runtime: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"output": {"hub": {"repoId": f"bench/model-{index}"}}}
    if runtime:
        spec["runtime"] = runtime
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "DPOJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- the threaded client ----------------------------------------------------------------------------------


def run_parallel(
    kubeconfig: Path, threads: int, count: int, work: Callable[[client.ApiClient, int], None]
) -> tuple[float, float]:
    """work(api, i) for i in range(count) from `threads` threads (one client each, connected before the clock
    starts); (monotonic time of the first call, seconds from it to the last one done)."""
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(count):
        todo.put(index)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)
    clients = [api_client(kubeconfig) for _ in range(threads)]
    for api in clients:  # open a connection each (TLS handshake), as a long-running client has
        client.VersionApi(api).get_code()

    def worker(api: client.ApiClient) -> None:
        barrier.wait()
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(api, index)
            except BaseException as exc:
                errors.append(exc)
                return

    workers = [threading.Thread(target=worker, args=(api,), daemon=True) for api in clients]
    for thread in workers:
        thread.start()
    barrier.wait()
    start = time.monotonic()
    for thread in workers:
        thread.join()
    elapsed = time.monotonic() - start
    for api in clients:
        api.close()
    if errors:
        raise RuntimeError(f"{len(errors)} writes failed, the first: {errors[0]}") from errors[0]
    return start, elapsed


def create_dpojob(namespace: str, runtime: dict[str, Any] | None = None) -> Callable[[client.ApiClient, int], None]:
    def work(api: client.ApiClient, index: int) -> None:
        body = dpojob(namespace, f"job-{index}", index, runtime)
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, PLURAL, body, _preload_content=False
        )

    return work


def baseline_writes(api: client.ApiClient, index: int) -> None:
    """What the operator writes for a new DPOJob's run, by a bare client: the DPOJob, its ConfigMap, its Job."""
    custom, core, batch = client.CustomObjectsApi(api), client.CoreV1Api(api), client.BatchV1Api(api)
    response = custom.create_namespaced_custom_object(
        API_GROUP, API_VERSION, BASELINE_NS, PLURAL, dpojob(BASELINE_NS, f"job-{index}", index), _preload_content=False
    )
    created = json.loads(response.data)
    generation = created["metadata"]["generation"]
    spec = DPOJobSpec.model_validate(created["spec"])
    core.create_namespaced_config_map(
        BASELINE_NS, manifests.build_config_map(created, generation), _preload_content=False
    )
    batch.create_namespaced_job(BASELINE_NS, manifests.build_job(created, spec, generation), _preload_content=False)


# --- watches ------------------------------------------------------------------------------------------------


class Watcher(threading.Thread):
    """List+watch of one kind in one namespace; on_event(type, object, monotonic arrival time) per event."""

    def __init__(self, api: client.ApiClient, kind: str, namespace: str, on_event: Callable[[str, dict, float], None]):
        super().__init__(name=f"watch-{kind}", daemon=True)
        self.kind, self.namespace, self.on_event = kind, namespace, on_event
        self.api = api
        self.stopping = threading.Event()
        self.last_event = time.monotonic()
        self.listed = threading.Event()

    def _list(self, **kwargs: Any) -> Any:
        if self.kind == "dpojobs":
            return client.CustomObjectsApi(self.api).list_namespaced_custom_object(
                API_GROUP, API_VERSION, self.namespace, PLURAL, _preload_content=False, **kwargs
            )
        return client.BatchV1Api(self.api).list_namespaced_job(self.namespace, _preload_content=False, **kwargs)

    def run(self) -> None:
        version = None
        while not self.stopping.is_set():
            try:
                if version is None:
                    body = json.loads(self._list().data)
                    version = body["metadata"]["resourceVersion"]
                    for item in body["items"]:
                        self.on_event("ADDED", item, time.monotonic())
                    self.listed.set()
                response = self._list(
                    watch=True, resource_version=version, allow_watch_bookmarks=True, timeout_seconds=60
                )
                try:
                    for line in iter_resp_lines(response):
                        if not line:
                            continue
                        arrived = time.monotonic()
                        event = json.loads(line)
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            version = None if obj.get("code") == 410 else version
                            break
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self.last_event = arrived
                            self.on_event(event["type"], obj, arrived)
                finally:
                    response.release_conn()
            except Exception:
                if self.stopping.wait(1.0):
                    return


class FirstSeen:
    """The watch arrival time of each object's ADDED event and, with `status_too`, of its first event whose
    status.phase is set."""

    def __init__(self, status_too: bool = False) -> None:
        self.times: dict[str, float] = {}
        self.status_times: dict[str, float] = {}
        self.status_too = status_too
        self.lock = threading.Lock()

    def __call__(self, kind: str, obj: dict, arrived: float) -> None:
        name = obj["metadata"]["name"]
        with self.lock:
            if kind == "ADDED":
                self.times.setdefault(name, arrived)
            if self.status_too and kind != "DELETED" and (obj.get("status") or {}).get("phase"):
                self.status_times.setdefault(name, arrived)


# --- the operator ------------------------------------------------------------------------------------------------


class Operator:
    def __init__(self, admin: Path, workdir: Path, audit_log: Path, resync_seconds: float) -> None:
        self.workdir = workdir
        kubeconfig = write_sa_kubeconfig(admin, OPERATOR_NAMESPACE, OPERATOR_ACCOUNT, workdir / "operator.kubeconfig")
        self.requests = AuditCounter(audit_log)
        self.port = free_port()
        env = {
            "DPO_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
            "DPO_OPERATOR_LISTEN_ADDRESS": "127.0.0.1",
            "DPO_OPERATOR_PORT": str(self.port),
        }
        self.process = OperatorProcess(kubeconfig, workdir / "operator.log", env, verbose=False)

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def start(self, timeout: float = 120.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.process is not None and self.process.process.poll() is not None:
                raise RuntimeError("the operator exited:\n" + self.process.logs()[-4000:])
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the operator did not get ready:\n" + self.process.logs()[-4000:])
            time.sleep(0.5)

    def stop(self) -> None:
        self.process.stop()

    def memory(self) -> dict[str, float]:
        return proc_status(self.pid)

    def counts(self) -> dict[str, int]:
        return self.requests.counts()

    def reset(self) -> dict[str, int]:
        return self.requests.reset()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.process.logs().splitlines()[-lines:])

    def reconciles(self) -> float:
        """dpo_operator_reconcile_total from its /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("dpo_operator_reconcile_total "):
                    return float(line.split()[1])
        raise RuntimeError("no dpo_operator_reconcile_total in /metrics")


def requests_summary(counts: dict[str, int], per: int) -> dict[str, Any]:
    requests = {k: v for k, v in counts.items() if not k.startswith("WATCH")}
    return {
        "total": sum(requests.values()),
        "per_dpojob": round(sum(requests.values()) / per, 2) if per else None,
        "watches_opened": sum(v for k, v in counts.items() if k.startswith("WATCH")),
        "by_verb_resource": counts,
        "per_dpojob_by_verb_resource": {k: round(v / per, 3) for k, v in counts.items()} if per else {},
    }


def active_requests(counts: dict[str, int]) -> int:
    return sum(v for k, v in counts.items() if not k.startswith(STREAMS))


def wait_for_all(
    lock: threading.Lock, times: dict[str, float], names: list[str], deadline: float, what: str, operator: Any
) -> float:
    """Until every name has a time in `times` (filled by a watch thread); the latest of them."""
    while True:
        with lock:
            done = sum(name in times for name in names)
            if done == len(names):
                return max(times[name] for name in names)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done}/{len(names)} {what} after the deadline\n{operator.log_tail()}")
        time.sleep(0.1)


def wait_quiet(operator: Operator, watchers: list[Watcher], quiet: float, timeout: float) -> float:
    """Until neither the audit log shows a request (other than watches/log streams) nor a watch sees an event for
    `quiet` seconds; returns when the last activity was (monotonic)."""
    deadline = time.monotonic() + timeout
    last_count, last_change = active_requests(operator.counts()), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        count = active_requests(operator.counts())
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        last_activity = max([last_change, *(w.last_event for w in watchers)])
        if time.monotonic() - last_activity >= quiet:
            return last_activity
    raise TimeoutError(f"the operator was still busy after {timeout:.0f}s")


# --- phases ---------------------------------------------------------------------------------------------------


def chart_memory_limit_mib() -> float:
    """The chart's default memory limit (values.yaml resources.limits.memory, in Mi or Gi)."""
    values = yaml.safe_load((REPO_ROOT / "charts" / "dpo-operator" / "values.yaml").read_text())
    limit = str(values["resources"]["limits"]["memory"])
    return float(limit[:-2]) * (1024 if limit.endswith("Gi") else 1) if limit.endswith(("Mi", "Gi")) else float(limit)


def measure_baseline(admin: Path, count: int, threads: int) -> dict[str, Any]:
    kubectl(admin, "create", "namespace", BASELINE_NS)
    _, seconds = run_parallel(admin, threads, count, baseline_writes)
    print(f"baseline: {count} x (DPOJob + ConfigMap + Job) in {seconds:.2f}s", flush=True)
    started = time.monotonic()
    kubectl(admin, "delete", "namespace", BASELINE_NS, "--wait=true", "--timeout=900s")
    return {
        "seconds": round(seconds, 2),
        "writes_per_second": round(3 * count / seconds, 1),
        "namespace_deleted_in_s": round(time.monotonic() - started, 1),
    }


def measure_restart(
    admin: Path, operator: Operator, workdir: Path, audit_log: Path, count: int, args: argparse.Namespace
) -> tuple[Operator, dict[str, Any]]:
    """The operator SIGKILLed (as an OOM kill or a lost node ends it) and started again with every DPOJob of the
    earlier phases in place (their Jobs and pending pods too): until it is ready, and until it has reconciled every
    DPOJob at least once and settled; its peak RSS over that (VmHWM of the new process) against the chart's memory
    limit, and the requests it made (a restart that finds nothing changed should write nothing)."""
    operator.process.stop(signal.SIGKILL)
    restarted = Operator(admin, workdir, audit_log, args.resync_seconds)
    restarted.reset()  # its counter read the audit log from the start: the killed process's requests
    started = time.monotonic()
    restarted.start()
    ready = time.monotonic() - started
    deadline = started + args.timeout
    while (done := restarted.reconciles()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done:.0f}/{count} reconciles after the restart\n{restarted.log_tail()}")
        time.sleep(1.0)
    every = time.monotonic() - started
    quiet_at = wait_quiet(restarted, [], args.quiet_seconds, timeout=args.timeout)
    memory = restarted.memory()
    limit = chart_memory_limit_mib()
    print(f"restart: ready {ready:.1f}s, every DPOJob reconciled {every:.1f}s; peak RSS {memory['VmHWM']} MiB "
          f"(chart limit {limit:.0f} MiB)", flush=True)  # fmt: skip
    return restarted, {
        "ready_seconds": round(ready, 1),
        "every_dpojob_reconciled_seconds": round(every, 1),
        "settled_seconds": round(quiet_at - started, 1),
        "rss_mib": memory,
        "chart_memory_limit_mib": limit,
        "peak_fraction_of_limit": round(memory["VmHWM"] / limit, 2),
        "requests": requests_summary(restarted.counts(), count),
    }


def measure_operator(admin: Path, operator: Operator, count: int, threads: int, args: argparse.Namespace) -> dict:
    kubectl(admin, "create", "namespace", OPERATOR_NS)
    api = api_client(admin)
    dpojobs_seen, jobs_seen = FirstSeen(status_too=True), FirstSeen()
    watchers = [Watcher(api, "dpojobs", OPERATOR_NS, dpojobs_seen), Watcher(api, "jobs", OPERATOR_NS, jobs_seen)]
    for watcher in watchers:
        watcher.start()
        watcher.listed.wait(30)
    expected = {manifests.run_name(f"job-{i}", 1): f"job-{i}" for i in range(count)}
    cpu_before = cpu_seconds(operator.pid)
    operator.reset()
    start, submit = run_parallel(admin, threads, count, create_dpojob(OPERATOR_NS))
    print(f"operator: {count} DPOJobs submitted in {submit:.2f}s", flush=True)
    deadline = start + args.timeout
    last_job = wait_for_all(jobs_seen.lock, jobs_seen.times, list(expected), deadline, "Jobs", operator)
    at_last_job = {"counts": operator.counts(), "memory": operator.memory(), "cpu": cpu_seconds(operator.pid)}
    elapsed = last_job - start
    print(f"operator: last Job seen {elapsed:.2f}s after the first DPOJob was submitted", flush=True)
    names = list(expected.values())
    # every DPOJob's first status (the operator writes them after the Jobs under a burst)
    last_status = wait_for_all(
        dpojobs_seen.lock, dpojobs_seen.status_times, names, deadline, "DPOJobs with a status", operator
    )
    print(f"operator: every DPOJob has a status {last_status - start:.2f}s after the first was submitted", flush=True)
    quiet_at = wait_quiet(operator, watchers, args.quiet_seconds, timeout=args.timeout)
    to_quiet = {"counts": operator.counts(), "memory": operator.memory(), "cpu": cpu_seconds(operator.pid)}
    for watcher in watchers:
        watcher.stopping.set()

    raw_dpojobs = client.CustomObjectsApi(api).list_namespaced_custom_object(
        API_GROUP, API_VERSION, OPERATOR_NS, PLURAL, _preload_content=False
    )
    created = {o["metadata"]["name"]: o["metadata"]["creationTimestamp"] for o in json.loads(raw_dpojobs.data)["items"]}
    raw_jobs = client.BatchV1Api(api).list_namespaced_job(OPERATOR_NS, _preload_content=False)
    job_created = {
        o["metadata"]["name"]: o["metadata"]["creationTimestamp"] for o in json.loads(raw_jobs.data)["items"]
    }
    server_delays = [server_time(job_created[job]) - server_time(created[name]) for job, name in expected.items()]
    watch_delays = [jobs_seen.times[job] - dpojobs_seen.times[name] for job, name in expected.items()]
    status_delays = [dpojobs_seen.status_times[name] - dpojobs_seen.times[name] for name in names]
    server_span = max(server_time(t) for t in job_created.values()) - min(server_time(t) for t in created.values())
    api.close()
    return {
        "submit_seconds": round(submit, 2),
        "first_submit_to_last_job_seconds": round(elapsed, 2),
        "server_span_seconds": round(server_span, 1),
        "dpojob_to_job_server_seconds": summary(server_delays, 50, 99),
        "dpojob_to_job_watch_seconds": summary(watch_delays, 50, 99),
        "first_submit_to_last_first_status_seconds": round(last_status - start, 2),
        "dpojob_to_first_status_watch_seconds": summary(status_delays, 50, 99),
        "settled_after_seconds": round(quiet_at - start, 1),
        "rss_mib_at_last_job": at_last_job["memory"],
        "rss_mib_settled": to_quiet["memory"],
        "cpu_seconds_to_last_job": round(at_last_job["cpu"] - cpu_before, 2),
        "cpu_seconds_to_settled": round(to_quiet["cpu"] - cpu_before, 2),
        "requests_to_last_job": requests_summary(at_last_job["counts"], count),
        "requests_to_settled": requests_summary(to_quiet["counts"], count),
    }


class StatusLog:
    """Per DPOJob: (arrival, status.progress.step, status.metrics[rewards/accuracies]) whenever they change."""

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[float, int, float]]] = {}
        self.lock = threading.Lock()

    def __call__(self, kind: str, obj: dict, arrived: float) -> None:
        status = obj.get("status") or {}
        step = int((status.get("progress") or {}).get("step") or 0)
        accuracy = float((status.get("metrics") or {}).get("rewards/accuracies", -1.0))
        with self.lock:
            history = self.seen.setdefault(obj["metadata"]["name"], [])
            if not history or history[-1][1:] != (step, accuracy):
                history.append((arrived, step, accuracy))

    def latest_step(self, name: str) -> int:
        with self.lock:
            history = self.seen.get(name) or []
            return history[-1][1] if history else 0

    def reflected(self, name: str, step: int, printed: float) -> float | None:
        """When the status first showed this step (or a later one) with its metric: the line's lag."""
        with self.lock:
            history = list(self.seen.get(name) or [])
        for arrived, seen_step, accuracy in history:
            if arrived >= printed and seen_step >= step and accuracy >= accuracy_at(step):
                return arrived - printed
        return None


def accuracy_at(step: int) -> float:
    return step / TOTAL_STEPS


def progress_line(step: int) -> bytes:
    """A DPO log line as the trainer writes it (the same model)."""
    metrics = {"loss": 0.5, "rewards/accuracies": accuracy_at(step), "rewards/margins": 0.1}
    return StageLog(stage=Stage.DPO, step=step, totalSteps=TOTAL_STEPS, metrics=metrics).line().encode() + b"\n"


def measure_lag(admin: Path, operator: Operator, workdir: Path, running: int, args: argparse.Namespace) -> dict:
    kubectl(admin, "create", "namespace", LAG_NS)
    node = NodeSpec("bench-node", cpu="1000", memory="4Ti", pods=running + 10)
    simulator = NodeSimulator(
        admin, [node], config=NodeSimConfig(mode="simulate", workdir=workdir / "node", heartbeat_s=10)
    )
    api = api_client(admin)
    statuses = StatusLog()
    watcher = Watcher(api, "dpojobs", LAG_NS, statuses)
    stop_feeding = threading.Event()
    printed: list[tuple[str, int, float]] = []  # (DPOJob, step, monotonic write time)
    try:
        simulator.start()
        watcher.start()
        watcher.listed.wait(30)

        def forever(pod: dict, container: str, restarts: int) -> Any:
            return RUN_FOREVER if pod["metadata"]["namespace"] == LAG_NS else None

        with simulator.scripted(forever):
            # small scratch: the default sizes (91Gi of ephemeral storage) would fit one pod per simulated node
            runtime = {"gpus": 0, "cpu": "10m", "memory": "32Mi", "scratchSize": "100Mi", "workDirSize": "100Mi"}
            start, _ = run_parallel(admin, args.threads, running, create_dpojob(LAG_NS, runtime))
            logs: dict[str, Any] = {}  # DPOJob -> its pod's container log (nodesim LogFile)
            deadline = start + args.timeout
            while len(logs) < running:
                pods = json.loads(client.CoreV1Api(api).list_namespaced_pod(LAG_NS, _preload_content=False).data)
                for pod in pods["items"]:
                    owner = (pod["metadata"].get("annotations") or {}).get(manifests.ANNOTATION_DPOJOB)
                    runner = simulator.runner(LAG_NS, pod["metadata"]["name"])
                    container = runner.container(manifests.CONTAINER) if runner else None
                    if owner and container is not None and container.logs and "running" in container.state:
                        logs.setdefault(owner, container.logs[-1])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(logs)}/{running} trainer pods running after {args.timeout}s")
                time.sleep(1.0)
            all_running = time.monotonic() - start
            print(f"lag: {running} trainer pods running {all_running:.1f}s after the first DPOJob", flush=True)

            def feed() -> None:
                names = sorted(logs)
                steps = dict.fromkeys(names, 0)
                began = time.monotonic()
                schedule = [(began + args.line_interval * i / len(names), name) for i, name in enumerate(names)]
                heapq.heapify(schedule)
                while not stop_feeding.is_set():
                    due, name = heapq.heappop(schedule)
                    if stop_feeding.wait(max(0.0, due - time.monotonic())):
                        return
                    steps[name] += 1
                    logs[name].write(progress_line(steps[name]))
                    printed.append((name, steps[name], time.monotonic()))
                    heapq.heappush(schedule, (due + args.line_interval, name))

            feeder = threading.Thread(target=feed, name="progress-feeder", daemon=True)
            feeding_since = time.monotonic()
            feeder.start()
            deadline = feeding_since + args.timeout
            while sum(statuses.latest_step(name) >= 1 for name in logs) < running:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not every DPOJob showed progress after {args.timeout}s")
                time.sleep(0.2)
            warmup = time.monotonic() - feeding_since
            print(f"lag: every status shows progress {warmup:.1f}s after the first line; measuring", flush=True)
            before_window = operator.reset()  # the phase so far: the pods' log streams opened, the first lines
            cpu_before = cpu_seconds(operator.pid)
            window_start = time.monotonic()
            time.sleep(args.lag_seconds)
            window_end = time.monotonic()
            stop_feeding.set()
            feeder.join()
            window_counts = operator.counts()
            cpu_window = cpu_seconds(operator.pid) - cpu_before
            memory = operator.memory()
            lines = [(n, s, t) for n, s, t in printed if window_start <= t < window_end]
            drain_deadline = time.monotonic() + max(30.0, 3 * args.line_interval)
            lags: list[float] = []
            while True:
                lags = [lag for n, s, t in lines if (lag := statuses.reflected(n, s, t)) is not None]
                if len(lags) == len(lines) or time.monotonic() > drain_deadline:
                    break
                time.sleep(1.0)
    finally:
        stop_feeding.set()
        watcher.stopping.set()
        simulator.stop()
        api.close()
    seconds = window_end - window_start
    status_patches = window_counts.get("PATCH dpojobs/status", 0)
    return {
        "running_pods": running,
        "line_interval_seconds": args.line_interval,
        "window_seconds": round(seconds, 1),
        "pods_running_after_seconds": round(all_running, 1),
        "all_statuses_show_progress_after_seconds": round(warmup, 1),
        "lines_written": len(lines),
        "lines_reflected": len(lags),
        "lag_seconds": summary(lags, 50, 95, 99),
        "rss_mib": memory,
        "operator_cpu_share": round(cpu_window / seconds, 2),
        "status_patches_per_second": round(status_patches / seconds, 1),
        "requests_per_second": round(
            sum(v for k, v in window_counts.items() if not k.startswith("WATCH")) / seconds, 1
        ),
        "requests_in_window": window_counts,
        "requests_before_window": before_window,
    }


# --- report -----------------------------------------------------------------------------------------------------


def fmt(value: Any, unit: str = "s") -> str:
    return "—" if value is None else f"{value:g} {unit}".strip()


def table(results: dict[str, Any]) -> str:
    n = results["config"]["count"]
    base, op = results["baseline"], results["operator"]
    ratio = results["ratio_operator_to_baseline"]
    rows = [
        ("measure", "result", "goal"),
        (
            f"baseline: {n} x (DPOJob + ConfigMap + Job), {results['config']['threads']} threads",
            fmt(base["seconds"]),
            "—",
        ),
        (
            f"operator: first of {n} DPOJobs submitted → last trainer Job exists",
            f"{fmt(op['first_submit_to_last_job_seconds'])} (submitting took {fmt(op['submit_seconds'])})",
            "—",
        ),
        ("ratio operator / baseline", f"**{ratio:g}x**", "≤ 1.5x"),
    ]
    server, watch = op["dpojob_to_job_server_seconds"], op["dpojob_to_job_watch_seconds"]
    first_status = op["dpojob_to_first_status_watch_seconds"]
    rows += [
        (
            "DPOJob → Job, creationTimestamps (1 s resolution) p50 / p99",
            f"{fmt(server['p50'])} / {fmt(server['p99'])}",
            "—",
        ),
        (
            "DPOJob → Job, watch arrival p50 / p99 / max",
            f"{fmt(watch['p50'])} / {fmt(watch['p99'])} / {fmt(watch['max'])}",
            "—",
        ),
        (
            "DPOJob → first status (phase set), watch arrival p50 / p99 / max",
            f"{fmt(first_status['p50'])} / {fmt(first_status['p99'])} / {fmt(first_status['max'])}",
            "—",
        ),
        (
            f"operator RSS: idle / at the last Job / settled ({n} DPOJobs) / peak",
            " / ".join(
                fmt(v, "MiB")
                for v in (
                    results["operator_idle_rss_mib"]["VmRSS"],
                    op["rss_mib_at_last_job"]["VmRSS"],
                    op["rss_mib_settled"]["VmRSS"],
                    results["operator_peak_rss_mib"],
                )
            ),
            "≤ 100 MiB at 1,000",
        ),
        (
            "operator CPU time: to the last Job / to settled",
            f"{fmt(op['cpu_seconds_to_last_job'])} / {fmt(op['cpu_seconds_to_settled'])}",
            "—",
        ),
    ]
    last, settled = op["requests_to_last_job"], op["requests_to_settled"]
    rows.append(
        (
            f"API requests per DPOJob: to the last Job / settled (quiet from {fmt(op['settled_after_seconds'])})",
            f"{last['per_dpojob']:g} / **{settled['per_dpojob']:g}** (+ {settled['watches_opened']} watches)",
            "—",
        )
    )
    for name, per in settled["per_dpojob_by_verb_resource"].items():
        if not name.startswith("WATCH"):
            rows.append(
                (f"  {name}", f"{per:g} (to the last Job {last['per_dpojob_by_verb_resource'].get(name, 0):g})", "")
            )
    lag = results.get("lag")
    if lag:
        lags = lag["lag_seconds"]
        rows += [
            (
                f"metric → status lag, {lag['running_pods']} pods Running, a line per pod every "
                f"{lag['line_interval_seconds']:g} s: p50 / p95 / max",
                f"{fmt(lags['p50'])} / **{fmt(lags['p95'])}** / {fmt(lags['max'])}"
                f" ({lag['lines_reflected']}/{lag['lines_written']} lines)",
                "p95 ≤ 10 s",
            ),
            (
                "  while streaming: operator RSS / CPU share / status patches per s / requests per s",
                f"{fmt(lag['rss_mib']['VmRSS'], 'MiB')} / {lag['operator_cpu_share']:g} / "
                f"{lag['status_patches_per_second']:g} / {lag['requests_per_second']:g}",
                "",
            ),
        ]
    restart = results.get("restart")
    if restart:
        rows.append(
            (
                "restart (SIGKILL): ready / every DPOJob reconciled / settled; peak RSS of the new process (chart "
                f"limit {restart['chart_memory_limit_mib']:g} MiB); requests per DPOJob",
                f"{fmt(restart['ready_seconds'])} / {fmt(restart['every_dpojob_reconciled_seconds'])} / "
                f"{fmt(restart['settled_seconds'])}; **{fmt(restart['rss_mib']['VmHWM'], 'MiB')}** "
                f"({restart['peak_fraction_of_limit']:g} of the limit); {restart['requests']['per_dpojob']:g}",
                "under the limit",
            )
        )
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "| --- | --- | --- |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000, help="DPOJobs of the baseline and the operator phase")
    parser.add_argument("--running", type=int, default=200, help="DPOJobs with a Running pod for the lag (0: skip)")
    parser.add_argument("--threads", type=int, default=8, help="client threads submitting")
    parser.add_argument("--line-interval", type=float, default=5.0, help="seconds between progress lines per pod")
    parser.add_argument("--lag-seconds", type=float, default=60.0, help="measurement window of the lag")
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="idle this long = the operator settled")
    parser.add_argument("--resync-seconds", type=float, default=30.0, help="the operator's resync (chart default)")
    parser.add_argument("--timeout", type=float, help="per phase (default: 300 s + 1 s per DPOJob)")
    parser.add_argument("--restart", action="store_true", help="then SIGKILL the operator and measure its restart")
    parser.add_argument("--json", type=Path, help="results file (default: out/operator_scale-<count>.json)")
    args = parser.parse_args()
    args.timeout = args.timeout or 300.0 + args.count + args.running
    json_path = args.json or REPO_ROOT / "out" / f"operator_scale-{args.count}.json"
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    results: dict[str, Any] = {
        "config": {
            "count": args.count,
            "running": args.running,
            "threads": args.threads,
            "line_interval_seconds": args.line_interval,
            "lag_window_seconds": args.lag_seconds,
            "resync_seconds": args.resync_seconds,
            "requests_counted_by": f"kube-apiserver audit log of {OPERATOR_USER}",
            "cpus": os.cpu_count(),
            "loadavg_at_start": loadavg(),
            "date": datetime.now().isoformat(timespec="seconds"),
        }
    }
    try:
        with LocalCluster(workdir / "cluster", audit_users=[OPERATOR_USER]) as cluster:
            admin = cluster.kubeconfig
            install(admin)
            results["baseline"] = measure_baseline(admin, args.count, args.threads)
            assert cluster.audit_log is not None
            operator = Operator(admin, workdir, cluster.audit_log, args.resync_seconds)
            try:
                operator.start()
                time.sleep(5)  # Kopf's watches open; its idle footprint is the first figure
                results["operator_idle_rss_mib"] = operator.memory()
                results["startup_requests"] = operator.reset()
                if not results["startup_requests"]:
                    raise RuntimeError(f"{cluster.audit_log} shows no request of {OPERATOR_USER}")
                results["operator"] = measure_operator(admin, operator, args.count, args.threads, args)
                results["ratio_operator_to_baseline"] = round(
                    results["operator"]["first_submit_to_last_job_seconds"] / results["baseline"]["seconds"], 2
                )
                if args.running:
                    results["lag"] = measure_lag(admin, operator, workdir, args.running, args)
                results["operator_peak_rss_mib"] = operator.memory()["VmHWM"]
                if args.restart:
                    operator, results["restart"] = measure_restart(
                        admin, operator, workdir, cluster.audit_log, args.count + args.running, args
                    )
            except BaseException:
                print(operator.log_tail(60))
                raise
            finally:
                operator.stop()
    except BaseException:
        print(f"failed; the logs (operator, control plane, audit log) are kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    results["config"]["loadavg_at_end"] = loadavg()
    results["run_seconds"] = round(time.monotonic() - began, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\n{results['run_seconds']:.0f} s in all; every number in {json_path}")


if __name__ == "__main__":
    main()
