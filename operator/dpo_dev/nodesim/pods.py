"""What a kubelet resolves for a pod's containers from the API server: env (envFrom, valueFrom, the downward API,
$(VAR) expansion), volumes as local directories (ConfigMap and Secret files, claims, fsGroup ownership), and
the service-account token. Anything missing is a ContainerConfigError, which the kubelet shows as
CreateContainerConfigError and retries."""

from __future__ import annotations

import base64
import json
import os
import re
from decimal import ROUND_CEILING
from pathlib import Path

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from .model import ContainerConfigError, NodeSpec

TOKEN_EXPIRATION_S = 3607  # what the kubelet asks TokenRequest for


def _expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined vars are substituted, $$ escapes, unknown refs stay as written."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


class PodResolver:
    """Reads what the pods of a simulator's nodes refer to (Secrets, ConfigMaps, claims, ServiceAccounts)."""

    def __init__(self, core: client.CoreV1Api, nodes: dict[str, NodeSpec], address: str, workdir: Path) -> None:
        self.core = core
        self.nodes = nodes
        self.address = address  # the nodes' IP: status.hostIP
        self.workdir = workdir  # where claims without a hostPath or local PV keep their data

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

    def resolve_env(self, pod: dict, spec: dict, pod_ip: str) -> dict[str, str]:
        """The container's env (its node's, then envFrom, then env with $(VAR) expansion), as the kubelet resolves
        it with a device plugin's variables (NodeSpec.env) under the pod's own."""
        namespace = pod["metadata"]["namespace"]
        node = self.nodes.get(pod["spec"].get("nodeName", ""))
        env: dict[str, str] = dict(node.env) if node is not None else {}
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


def own_volumes(pod: dict, volumes: dict[str, Path]) -> None:
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
