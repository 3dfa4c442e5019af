"""Kopf handler bodies: wire the operator's settings and hand every event to the reconciler."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from .kube import Kube
from .manifests import LABEL_DPOJOB, MANAGED_BY
from .reconciler import OperatorConfig, Reconciler

log = logging.getLogger(__name__)


def config_from_env(namespaces: list[str]) -> OperatorConfig:
    """Operator settings from the environment (the Helm chart sets these)."""
    trainer_env = json.loads(os.environ.get("DPO_OPERATOR_TRAINER_ENV") or "{}")
    if not isinstance(trainer_env, dict) or not all(isinstance(v, str) for v in trainer_env.values()):
        raise ValueError("DPO_OPERATOR_TRAINER_ENV must be a JSON object of strings")
    return OperatorConfig(
        trainer_env=trainer_env,
        resync_seconds=float(os.environ.get("DPO_OPERATOR_RESYNC_SECONDS", "30")),
        namespaces=namespaces,
    )


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Only our own Events; watch only our children server-side; start the reconciler.

    Handlers are on.event only, so Kopf writes nothing to the objects: no finalizer, no annotations.
    """
    settings.posting.enabled = False
    settings.execution.max_workers = int(os.environ.get("DPO_OPERATOR_WORKERS", "8"))
    for resource in ("jobs", "pods"):
        settings.watching.label_selectors[resource] = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    kube = Kube(client.ApiClient())
    namespaces = memo.get("namespaces") or [n for n in os.environ.get("DPO_OPERATOR_NAMESPACES", "").split(",") if n]
    operator_config = config_from_env(namespaces)
    operator_config.ignore_disruptions = kube.supports_pod_failure_policy()
    memo.reconciler = Reconciler(kube, operator_config)
    memo.reconciler.start()


def cleanup(memo: kopf.Memo) -> None:
    memo.reconciler.stop()


def on_dpojob(event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo) -> None:
    if event.get("type") == "DELETED":
        memo.reconciler.forget(namespace, name)
        return
    memo.reconciler.reconcile_safely(namespace, name)


def on_child(namespace: str, labels: dict[str, str], memo: kopf.Memo) -> None:
    """A trainer Job or pod changed: reconcile the DPOJob it belongs to."""
    memo.reconciler.reconcile_safely(namespace, labels[LABEL_DPOJOB])
