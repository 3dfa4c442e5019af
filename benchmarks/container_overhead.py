"""What container mode costs over process mode on the node simulator, both measured in the same run.

    .venv/bin/python benchmarks/container_overhead.py                      # 10 pods and 3 quickstarts per mode
    .venv/bin/python benchmarks/container_overhead.py --pods 20 --quickstarts 3

1. Pod start: pods whose command prints time.time() (`python -c ...`: the venv's python in process mode, the
   trainer image's in container mode), one at a time, the modes alternating. From the moment the pod is bound
   (a watch sees spec.nodeName) to its first instruction (the printed time), to the status saying Running, and
   to Succeeded.
2. The quickstart end to end (LocalStack: helm install of the operator, then examples/quickstart.yaml with the
   real trainer pushing to the local Hub): stack start, and apply -> DPOJob Succeeded, split into apply -> trainer
   pod bound -> Running -> pod Succeeded -> DPOJob Succeeded; the modes alternate per round.

Prints one JSON object (seconds; ratios container/process of the medians); docs/benchmarks.md quotes it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config, watch

from dpo_dev.cluster import LocalCluster
from dpo_dev.images import ensure_images
from dpo_dev.nodesim import NodeSimConfig, NodeSimulator, NodeSpec
from dpo_dev.stack import OPERATOR_NAMESPACE, RELEASE, LocalStack, kubectl, quickstart_for_cluster

MODES = ("process", "container")
PRINT_TIME = ["python", "-c", "import time; print(repr(time.time()), flush=True)"]


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


class PodClock:
    """Local times at which a watch on the namespace first saw each pod bound, Running and Succeeded."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.seen: dict[str, dict[str, float]] = {}
        self.changed = threading.Condition()
        self._watch = watch.Watch()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the stream breaks when the namespace or the cluster goes
            for event in self._watch.stream(self.core.list_namespaced_pod, self.namespace):
                pod, now = event["object"], time.time()
                with self.changed:
                    marks = self.seen.setdefault(pod.metadata.name, {})
                    if pod.spec.node_name:
                        marks.setdefault("bound", now)
                    if pod.status.phase in ("Running", "Succeeded", "Failed"):
                        marks.setdefault(pod.status.phase, now)
                    self.changed.notify_all()

    def wait(self, name: str, mark: str, timeout: float = 120) -> dict[str, float]:
        with self.changed:
            if not self.changed.wait_for(lambda: mark in self.seen.get(name, {}), timeout):
                raise TimeoutError(f"pod {name}: no {mark} after {timeout}s ({self.seen.get(name)})")
            return dict(self.seen[name])

    def stop(self) -> None:
        self._watch.stop()


def pod_starts(kubeconfig: Path, workdir: Path, rounds: int) -> dict[str, Any]:
    """Bound -> first instruction / Running / Succeeded for ``rounds`` pods per mode, the modes alternating."""
    config.load_kube_config(str(kubeconfig))
    core = client.CoreV1Api()
    namespace = "bench-pod-start"
    core.create_namespace({"metadata": {"name": namespace}})
    simulators = {
        mode: NodeSimulator(
            kubeconfig,
            [
                NodeSpec(
                    f"bench-{mode}",
                    labels={"bench": mode},
                    taints=[{"key": "bench", "value": mode, "effect": "NoSchedule"}],
                )
            ],
            config=NodeSimConfig(mode=mode, workdir=workdir / mode),
        ).start()
        for mode in MODES
    }
    clock = PodClock(core, namespace)
    samples: dict[str, dict[str, list[float]]] = {
        m: {"first_instruction": [], "running": [], "succeeded": []} for m in MODES
    }
    try:
        for index, mode in itertools.product(range(rounds), MODES):
            name = f"{mode}-{index}"
            toleration = {"key": "bench", "operator": "Equal", "value": mode, "effect": "NoSchedule"}
            container = {"name": "main", "image": "dpo-trainer:0.1.0", "command": PRINT_TIME}
            spec = {"restartPolicy": "Never", "nodeSelector": {"bench": mode}, "tolerations": [toleration],
                    "automountServiceAccountToken": False, "containers": [container]}  # fmt: skip
            core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": spec})
            marks = clock.wait(name, "Succeeded")
            printed = float(core.read_namespaced_pod_log(name, namespace).split()[0])
            samples[mode]["first_instruction"].append(printed - marks["bound"])
            samples[mode]["running"].append(marks["Running"] - marks["bound"])
            samples[mode]["succeeded"].append(marks["Succeeded"] - marks["bound"])
    finally:
        clock.stop()
        for simulator in simulators.values():
            simulator.stop()
        core.delete_namespace(namespace)
    result: dict[str, Any] = {
        mode: {measure: {"median": median(values), "max": round(max(values), 3)} for measure, values in by.items()}
        for mode, by in samples.items()
    }
    result["container_minus_process_s"] = {
        measure: round(result["container"][measure]["median"] - result["process"][measure]["median"], 3)
        for measure in samples["process"]
    }
    return result


def quickstarts(kubeconfig: Path, workdir: Path, rounds: int) -> dict[str, Any]:
    """LocalStack start and the quickstart per mode, split into its steps; round r starts with mode r % 2."""
    config.load_kube_config(str(kubeconfig))
    core, custom = client.CoreV1Api(), client.CustomObjectsApi()
    steps = ("stack_start", "apply_to_bound", "bound_to_running", "trainer_running", "pod_done_to_dpojob_done", "total")
    samples: dict[str, dict[str, list[float]]] = {m: {step: [] for step in steps} for m in MODES}
    for index in range(rounds):
        for mode in MODES[index % 2 :] + MODES[: index % 2]:
            namespace = f"bench-{mode}-{index}"
            started = time.monotonic()
            with LocalStack(kubeconfig, workdir / namespace, mode=mode) as stack:
                samples[mode]["stack_start"].append(time.monotonic() - started)
                stack.create_token_secret(namespace)
                clock = PodClock(core, namespace)
                document = quickstart_for_cluster(namespace, repo=f"demo/{namespace}")
                applied = time.time()
                kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(document))
                deadline = applied + 900
                while (phase := _dpojob_phase(custom, namespace)) not in ("Succeeded", "Failed"):
                    if time.time() > deadline:
                        raise TimeoutError(f"{mode} quickstart not done after 900 s")
                    time.sleep(0.1)
                done = time.time()
                clock.stop()
                if phase != "Succeeded":
                    raise RuntimeError(
                        f"{mode} quickstart failed: {stack.get_dpojob(namespace, 'quickstart')['status']}"
                    )
            # The uninstalled operator leaves its Lease held: without this the next one waits up to 15 s for it.
            kubectl(kubeconfig, "-n", OPERATOR_NAMESPACE, "delete", "lease", RELEASE, "--ignore-not-found")
            (pod,) = [marks for name, marks in clock.seen.items() if name.startswith("quickstart-")]
            for step, value in (
                ("apply_to_bound", pod["bound"] - applied),
                ("bound_to_running", pod["Running"] - pod["bound"]),
                ("trainer_running", pod["Succeeded"] - pod["Running"]),
                ("pod_done_to_dpojob_done", done - pod["Succeeded"]),
                ("total", done - applied),
            ):
                samples[mode][step].append(value)
            shown = ", ".join(f"{step} {values[-1]:.2f}s" for step, values in samples[mode].items())
            print(f"[bench] {namespace}: {shown}", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        mode: {step: {"median": median(v), "all": [round(x, 2) for x in v]} for step, v in by.items()}
        for mode, by in samples.items()
    }
    result["container_over_process"] = {
        step: round(result["container"][step]["median"] / result["process"][step]["median"], 3)
        for step in ("stack_start", "trainer_running", "total")
    }
    return result


def _dpojob_phase(custom: client.CustomObjectsApi, namespace: str) -> str | None:
    obj = custom.get_namespaced_custom_object("dpo-operator.io", "v1alpha1", namespace, "dpojobs", "quickstart")
    return (obj.get("status") or {}).get("phase")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=10, help="pods per mode (default: %(default)s)")
    parser.add_argument("--quickstarts", type=int, default=3, help="quickstart runs per mode (default: %(default)s)")
    args = parser.parse_args()
    images = ensure_images(lambda m: print(f"[images] {m}", file=sys.stderr, flush=True))  # not timed below
    result: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "images": {name: info.source for name, info in images.items()},
    }
    workdir = Path(tempfile.mkdtemp(prefix="dpo-bench-containers-"))
    with LocalCluster(workdir / "cluster") as cluster:
        result["pod_start_s"] = pod_starts(cluster.kubeconfig, workdir, args.pods)
        result["quickstart_s"] = quickstarts(cluster.kubeconfig, workdir, args.quickstarts)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
