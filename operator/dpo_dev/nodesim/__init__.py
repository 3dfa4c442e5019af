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

Modules:

* ``model``: NodeSpec, Outcome and Rule (scripting), NodeSimConfig, parse_node, shared constants;
* ``simulator``: NodeSimulator: the kubelet endpoint, pod watch, pod IPs, deletion, claim provisioning;
* ``nodes``: Node registration, status and Lease heartbeats;
* ``runner``: one pod's life: containers, restarts, probes, token, status; simulate mode;
* ``process``: process mode; ``podman``: container mode (podman arguments from the pod spec);
* ``pods``: what a pod's containers get from the API (env, volumes, service-account token);
* ``logs``: container log files and termination messages; ``kubelet``: the HTTPS log endpoint.
"""

from .model import (
    RUN_FOREVER,
    SERVICE_ACCOUNT_DIR,
    ContainerConfigError,
    NodeSimConfig,
    NodeSpec,
    Outcome,
    Rule,
    parse_node,
)
from .podman import ContainerRun, local_image_refs, podman_run_args
from .simulator import NodeSimulator

__all__ = [
    "RUN_FOREVER",
    "SERVICE_ACCOUNT_DIR",
    "ContainerConfigError",
    "ContainerRun",
    "NodeSimConfig",
    "NodeSimulator",
    "NodeSpec",
    "Outcome",
    "Rule",
    "local_image_refs",
    "parse_node",
    "podman_run_args",
]
