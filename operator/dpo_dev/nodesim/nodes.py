"""The Node objects a kubelet keeps: registration with capacity, labels and taints, then Lease and Ready-condition
heartbeats, so the scheduler uses the fake nodes and nodelifecycle never taints or evicts them."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .model import NodeSpec, _now, _now_micro

log = logging.getLogger(__name__)

NOT_READY_TAINT = "node.kubernetes.io/not-ready"
KUBELET_VERSION = "v1.20.2-nodesim"


class NodeRegistry:
    """Registers a simulator's nodes and keeps them Ready."""

    def __init__(self, api: client.ApiClient, nodes: dict[str, NodeSpec], address: str, kubelet_port: int) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.nodes = nodes
        self.address = address  # InternalIP
        self.kubelet_port = kubelet_port  # daemonEndpoints: where the apiserver reaches the kubelet endpoint
        self._registered_at: dict[str, str] = {}

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

    def register(self, node: NodeSpec) -> None:
        """Create (or update) the Node with its full status, and its Lease."""
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

    def heartbeat(self, stopping: threading.Event, period_s: float) -> None:
        """Keep Leases and Ready conditions fresh so nodelifecycle never taints or evicts the fake nodes."""
        while not stopping.wait(period_s):
            for node in self.nodes.values():
                try:
                    self._renew_lease(node)
                    self.core.patch_node_status(
                        node.name, self._node_status(node, full=False), _content_type="application/merge-patch+json"
                    )
                except ApiException as exc:
                    if exc.status == 404:  # someone deleted the Node: re-register, as a kubelet does
                        with contextlib.suppress(ApiException, OSError):
                            self.register(node)
                    else:
                        log.warning("nodesim: heartbeat for %s failed: %s", node.name, exc)
                except OSError as exc:
                    if not stopping.is_set():
                        log.warning("nodesim: heartbeat for %s failed: %s", node.name, exc)

    def wait_schedulable(self, timeout: float) -> None:
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
