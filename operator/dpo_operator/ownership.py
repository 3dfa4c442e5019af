"""Which trainer Jobs are the operator's: an HMAC only the operator can compute, over what only the API server
assigns.

An ownerReference, labels, annotations and the pod template can all be copied by anyone who may create Jobs in
the namespace, and a Job's content is changed by mutating admission webhooks (sidecar injectors, image-rewriting
policies) after the operator sent it. So neither "it names us as controller" nor "it runs what we would create"
decides. Right after creating a Job the operator annotates it with HMAC-SHA256(key, the Job's UID, namespace,
name, the DPOJob's UID, the hash of the manifest the operator built). The UID is assigned by the API server and
a Job's pod template cannot be changed after creation, so the signature says "this very Job was created by the
operator for this run" and nothing a forger copies from it makes another Job pass; what webhooks added stays
ours. The key lives in a Secret in the operator's namespace (load_key), created at the first start.

A Job the operator created but could not sign (it stopped between the two writes) looks like a forgery; both
are deleted and the run's Job created again (ours resumes from its checkpoints).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from typing import Any

from kubernetes.client.exceptions import ApiException

from dpojob_api.spec import API_GROUP

from .kube import Kube, resource_path

log = logging.getLogger(__name__)

SIGNATURE_ANNOTATION = f"{API_GROUP}/signature"
"""On a trainer Job: `v1:<hex HMAC>` (see the module docstring)."""
TEMPLATE_ANNOTATION = f"{API_GROUP}/template-hash"
"""On a trainer Job: manifests.template_hash of the manifest the operator built (before any webhook changed it)."""
KEY_FIELD = "key"
_VERSION = "v1"


class RunSigner:
    """Signs the Jobs the operator creates and recognises them later."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the signing key must hold at least 32 bytes")
        self._key = key

    @classmethod
    def ephemeral(cls) -> RunSigner:
        """A key for this process only (local development): after a restart, unfinished runs' Jobs are replaced."""
        return cls(secrets.token_bytes(32))

    def signature(self, job: dict[str, Any], dpojob_uid: str) -> str:
        """The signature of a created Job (it has its UID) for the DPOJob `dpojob_uid`."""
        meta = job["metadata"]
        template = (meta.get("annotations") or {}).get(TEMPLATE_ANNOTATION, "")
        message = "\n".join([_VERSION, meta["uid"], meta["namespace"], meta["name"], dpojob_uid, template])
        return f"{_VERSION}:{hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()}"

    def signed(self, job: dict[str, Any], dpojob_uid: str) -> bool:
        """Whether the operator created this Job for this DPOJob (see the module docstring)."""
        found = (job["metadata"].get("annotations") or {}).get(SIGNATURE_ANNOTATION)
        return isinstance(found, str) and hmac.compare_digest(found, self.signature(job, dpojob_uid))


def load_key(kube: Kube, namespace: str, secret_name: str) -> bytes:
    """The signing key from Secret `secret_name` in the operator's namespace, created with a random key when absent
    (two replicas starting at once: the second create is refused and it reads the first one's)."""
    path = resource_path("Secret", namespace, secret_name)
    try:
        secret = kube.request("GET", path)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": secret_name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "dpo-operator"},
            },
            "type": "Opaque",
            "data": {KEY_FIELD: base64.b64encode(secrets.token_bytes(32)).decode()},
        }
        try:
            secret = kube.request("POST", resource_path("Secret", namespace), body=body)
            log.info("created the Job signing key in Secret %s/%s", namespace, secret_name)
        except ApiException as conflict:
            if conflict.status != 409:
                raise
            secret = kube.request("GET", path)
    encoded = (secret.get("data") or {}).get(KEY_FIELD)
    if not encoded:
        raise ValueError(f"Secret {namespace}/{secret_name} has no data key {KEY_FIELD!r}")
    return base64.b64decode(encoded)
