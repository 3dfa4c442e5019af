"""Crash safety: 50 concurrent DPOJobs while the operator is SIGKILLed 20 times at random moments.

The operator runs from its Helm chart on the local control plane; the node simulator plays the trainer pods
(each runs 10-60 s, then ends the way the trainer does) and restarts the killed operator container as a
kubelet would. Throughout: never two Jobs for one DPOJob. At the end: every DPOJob Succeeded, and every
status agrees with its Job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dpo_dev.nodesim import Outcome
from dpo_dev.stack import LocalStack, kubectl

NS = "chaos"
COUNT, KILLS = 50, 20
ANNOTATION = "dpo-operator.io/dpojob-name"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def stack(admin_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    values = {"leaderElection": {"enabled": False}}  # one replica, restarted in place: the quickest comeback
    with LocalStack(admin_kubeconfig, tmp_path_factory.mktemp("chaos"), resync_seconds=5, values=values) as stack:
        # CrashLoopBackOff, shortened so 20 kills fit in minutes
        stack.simulator.config = dataclasses.replace(stack.simulator.config, max_restart_backoff_s=2.0)
        kubectl(admin_kubeconfig, "create", "namespace", NS, check=False)
        yield stack


def trainer_outcome(pod: dict, container: str, restarts: int) -> Outcome | None:
    """Chaos DPOJobs' pods run 10-60 s (fixed per pod), then succeed with a trainer-like termination message."""
    name = (pod["metadata"].get("annotations") or {}).get(ANNOTATION, "")
    if not name.startswith("chaos-"):
        return None
    seconds = 10 + int(hashlib.sha256(pod["metadata"]["name"].encode()).hexdigest(), 16) % 50
    message = {"reason": "Succeeded", "metrics": {"rewards/margins": 0.5}, "model": {"repoId": f"demo/{name}"}}
    return Outcome(duration_s=seconds, message=json.dumps(message))


def dpojob(index: int) -> dict:
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": f"chaos-{index:02d}", "namespace": NS},
        "spec": {
            "output": {"hub": {"repoId": f"demo/chaos-{index:02d}"}},
            "runtime": {"gpus": 0, "cpu": "100m", "memory": "64Mi", "scratchSize": "100Mi", "workDirSize": "100Mi"},
        },
    }


def test_sigkills_never_duplicate_a_job_and_every_dpojob_finishes(stack: LocalStack, api_client: object) -> None:
    from kubernetes import client

    batch, custom = client.BatchV1Api(api_client), client.CustomObjectsApi(api_client)
    most_jobs_per_dpojob: Counter[str] = Counter()
    stop = threading.Event()

    def watch_jobs() -> None:
        while not stop.is_set():
            jobs = batch.list_namespaced_job(NS).items
            for name, count in Counter((j.metadata.annotations or {}).get(ANNOTATION) for j in jobs).items():
                most_jobs_per_dpojob[name] = max(most_jobs_per_dpojob[name], count)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch_jobs, daemon=True)
    rng = random.Random(7)
    kills = 0
    with stack.simulator.scripted(trainer_outcome):
        watcher.start()
        listing = {"apiVersion": "v1", "kind": "List", "items": [dpojob(i) for i in range(COUNT)]}
        kubectl(stack.admin_kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(listing))
        deadline = time.monotonic() + 400
        killed: set[object] = set()
        while kills < KILLS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.5, 4.0))
            pod = stack.operator.pods()[0]["metadata"]["name"]
            runner = stack.simulator.runner(stack.operator.namespace, pod)
            process = runner.processes[-1] if runner is not None and runner.processes else None
            if process is None or process in killed or process.poll() is not None:
                continue  # between a kill and the restart: nothing to kill yet
            stack.operator.kill(pod)
            killed.add(process)
            kills += 1
        assert kills == KILLS

        def finished() -> list[dict]:
            items = custom.list_namespaced_custom_object("dpo-operator.io", "v1alpha1", NS, "dpojobs")["items"]
            done = [i for i in items if (i.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
            return items if len(done) == COUNT else []

        deadline = time.monotonic() + 300
        while not (items := finished()) and time.monotonic() < deadline:
            time.sleep(2)
        stop.set()
        watcher.join()
    assert items, "not every DPOJob reached a terminal phase"
    assert max(most_jobs_per_dpojob.values()) == 1, "a DPOJob had two trainer Jobs at once"
    jobs = {j.metadata.annotations[ANNOTATION]: j for j in batch.list_namespaced_job(NS).items}
    for item in items:
        name, status = item["metadata"]["name"], item["status"]
        assert status["phase"] == "Succeeded", (name, status.get("conditions"))
        job = jobs[name]
        assert status["trainer"]["jobName"] == job.metadata.name and job.status.succeeded == 1, name
        assert status["model"] == {"repoId": f"demo/{name}"} and status["run"]["generation"] == 1, name
        assert not status.get("runs"), f"{name}: a crash must not start a second run"

    def restarts() -> int:
        return stack.operator.pods()[0]["status"]["containerStatuses"][0]["restartCount"]

    deadline = time.monotonic() + 120  # the last kill may still be in its CrashLoopBackOff back-off
    while restarts() < KILLS and time.monotonic() < deadline:
        time.sleep(2)
    assert restarts() >= KILLS
