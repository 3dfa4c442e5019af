"""A mutating admission webhook for Jobs, as sidecar injectors and policy engines (Kyverno, image-rewriting
policies) run in real clusters: the API server calls it on every Job create in the namespaces labelled
WEBHOOK_LABEL and stores the Job it returns, with an env var added to every container, a sidecar and labels.

Tests register it with `JobWebhook.configuration()` (a MutatingWebhookConfiguration whose client config is a URL
on 127.0.0.1: the local API server runs on this host) to check that the operator takes a Job changed this way as
its own.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .api_proxy import self_signed

WEBHOOK_LABEL = "webhook.dpo.dev/mutate-jobs"
"""Namespaces with this label (value "true") have their Jobs mutated."""
MUTATED_LABEL = "webhook.dpo.dev/mutated"
INJECTED_ENV = "WEBHOOK_INJECTED"
SIDECAR = "webhook-sidecar"


def mutation(job: dict[str, Any]) -> list[dict[str, Any]]:
    """JSON Patch: a label on the Job and its pods, an env var in every container, a sidecar that runs the first
    container's image and exits."""
    pod = job["spec"]["template"]
    containers = pod["spec"]["containers"]
    ops: list[dict[str, Any]] = []
    for target, meta in (("/metadata", job["metadata"]), ("/spec/template/metadata", pod.get("metadata") or {})):
        if "labels" not in meta:
            ops.append({"op": "add", "path": f"{target}/labels", "value": {}})
        ops.append({"op": "add", "path": f"{target}/labels/{MUTATED_LABEL.replace('/', '~1')}", "value": "true"})
    for index, container in enumerate(containers):
        if "env" not in container:
            ops.append({"op": "add", "path": f"/spec/template/spec/containers/{index}/env", "value": []})
        ops.append(
            {
                "op": "add",
                "path": f"/spec/template/spec/containers/{index}/env/-",
                "value": {"name": INJECTED_ENV, "value": "1"},
            }
        )
    sidecar = {
        "name": SIDECAR,
        "image": containers[0]["image"],
        "command": ["python3", "-c", f"print('{SIDECAR} ran')"],
        "env": [{"name": INJECTED_ENV, "value": "1"}],
    }
    ops.append({"op": "add", "path": "/spec/template/spec/containers/-", "value": sidecar})
    return ops


class JobWebhook:
    """The webhook server (HTTPS on 127.0.0.1, a self-signed certificate the configuration carries as caBundle)."""

    def __init__(self, workdir: Path) -> None:
        self.cert, key = self_signed(workdir)
        self.mutated: list[str] = []
        """Names of the Jobs it changed, in order."""
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                request = review["request"]
                job = request["object"]
                webhook.mutated.append(job["metadata"].get("name") or job["metadata"].get("generateName", ""))
                patch = base64.b64encode(json.dumps(mutation(job)).encode()).decode()
                body = json.dumps(
                    {
                        "apiVersion": "admission.k8s.io/v1",
                        "kind": "AdmissionReview",
                        "response": {"uid": request["uid"], "allowed": True, "patchType": "JSONPatch", "patch": patch},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="job-webhook", daemon=True)

    def __enter__(self) -> JobWebhook:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configuration(self, name: str = "dpo-dev-job-webhook") -> dict[str, Any]:
        """The MutatingWebhookConfiguration that sends Job creates in WEBHOOK_LABEL namespaces here."""
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "jobs.webhook.dpo.dev",
                    "clientConfig": {
                        "url": f"https://127.0.0.1:{self._server.server_address[1]}/mutate",
                        "caBundle": base64.b64encode(self.cert.read_bytes()).decode(),
                    },
                    "rules": [
                        {"apiGroups": ["batch"], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["jobs"]}
                    ],
                    "namespaceSelector": {"matchLabels": {WEBHOOK_LABEL: "true"}},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 10,
                }
            ],
        }
