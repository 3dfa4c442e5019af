"""Kopf handler bodies: wire the operator's settings and hand every event to the reconciler."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import kopf
from kubernetes import client, config

from .kube import Kube
from .reconciler import OperatorConfig, Reconciler
from .spec import API_GROUP

log = logging.getLogger(__name__)


def config_from_env() -> OperatorConfig:
    """Operator settings from the environment (the Helm chart sets these)."""
    trainer_env = json.loads(os.environ.get("DPO_OPERATOR_TRAINER_ENV") or "{}")
    if not isinstance(trainer_env, dict) or not all(isinstance(v, str) for v in trainer_env.values()):
        raise ValueError("DPO_OPERATOR_TRAINER_ENV must be a JSON object of strings")
    return OperatorConfig(
        trainer_env=trainer_env, resync_seconds=float(os.environ.get("DPO_OPERATOR_RESYNC_SECONDS", "30"))
    )


def startup(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """Own annotation prefix, no Kopf finalizer (nothing needs one), our own Events; start the reconciler."""
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = False
    settings.execution.max_workers = int(os.environ.get("DPO_OPERATOR_WORKERS", "8"))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    memo.reconciler = Reconciler(Kube(client.ApiClient()), config_from_env())
    memo.reconciler.start()


def cleanup(memo: kopf.Memo) -> None:
    memo.reconciler.stop()


def on_dpojob(event: dict[str, Any], namespace: str, name: str, memo: kopf.Memo) -> None:
    if event.get("type") == "DELETED":
        memo.reconciler.followers.forget(namespace, name)
        return
    memo.reconciler.reconcile_safely(namespace, name)


def on_child(namespace: str, labels: dict[str, str], memo: kopf.Memo) -> None:
    """A trainer Job or pod changed: reconcile the DPOJob it belongs to."""
    memo.reconciler.reconcile_safely(namespace, labels["dpo-operator.io/dpojob"])
