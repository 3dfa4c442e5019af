"""What callers describe and script: the fake nodes, scripted outcomes, the simulator's configuration, and the
constants and time formats the other modules share."""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ANNOTATION_PREFIX = "nodesim.dpo.dev/"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_PULL_ERROR_MARKERS = ("does-not-exist",)
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # where in-cluster clients look
MODES = ("process", "simulate", "container")


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
    env: dict[str, str] = field(default_factory=dict)
    """What this node adds to every container's env (under the pod's own), as a device plugin does; e.g.
    DPO_GPU_MEMORY for a node whose GPUs are small (the trainer's preflight reads it)."""

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


@dataclass(frozen=True)
class NodeSimConfig:
    """How a NodeSimulator runs the pods bound to its nodes; the defaults suit tests."""

    mode: str = "process"  # how a container no rule or annotation scripts runs: one of MODES
    workdir: Path | None = None  # pod dirs, logs, volumes, the TLS cert; None: a temporary dir, removed by stop()
    cwd: Path = field(default_factory=Path.cwd)  # process mode: where the processes run
    bin_dir: Path = field(default_factory=lambda: Path(sys.executable).parent)  # process mode: first on PATH
    env: Mapping[str, str] = field(default_factory=dict)  # process mode: over the simulator's env, under the pod's
    image_entrypoints: Mapping[str, Sequence[str]] = field(default_factory=dict)  # process mode: repository -> argv
    # Container mode: pod image name -> local reference, as `kind load` puts an image on a node under the
    # name pods use (e.g. the operator's default trainer image, ghcr.io/..., as localhost/dpo-trainer).
    preloaded_images: Mapping[str, str] = field(default_factory=dict)
    address: str = "127.0.0.1"  # the nodes' InternalIP and where the kubelet endpoint listens
    pull_error_markers: tuple[str, ...] = DEFAULT_PULL_ERROR_MARKERS  # an image named with one never pulls
    pull_backoff_s: float = 2.0  # ErrImagePull, then ImagePullBackOff after this long
    restart_backoff_s: float = 1.0  # CrashLoopBackOff: the first delay, doubled per restart
    max_restart_backoff_s: float = 10.0
    max_grace_s: float = 10.0  # caps terminationGracePeriodSeconds
    heartbeat_s: float = 10.0  # Lease and Ready condition renewal
    delete_nodes_on_stop: bool = True
    provision_volumes: bool = True  # hostPath PVs for unbound claims without a StorageClass

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")


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
