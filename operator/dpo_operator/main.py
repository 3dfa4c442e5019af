"""Entry module: registers the Kopf handlers, and the `dpo-operator` console script.

Run with `dpo-operator` or `kopf run -m dpo_operator.main --all-namespaces`.
"""

from __future__ import annotations

import argparse

import kopf

from . import handlers
from .manifests import LABEL_DPOJOB, MANAGED_BY
from .spec import API_GROUP, API_VERSION, PLURAL

CHILDREN = {LABEL_DPOJOB: kopf.PRESENT, "app.kubernetes.io/managed-by": MANAGED_BY}


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: object) -> None:
    handlers.startup(settings, memo)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: object) -> None:
    handlers.cleanup(memo)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def dpojob_event(event: dict, namespace: str, name: str, memo: kopf.Memo, **_: object) -> None:
    handlers.on_dpojob(event, namespace, name, memo)


@kopf.on.event("batch", "v1", "jobs", labels=CHILDREN)
def job_event(namespace: str, labels: dict, memo: kopf.Memo, **_: object) -> None:
    handlers.on_child(namespace, labels, memo)


@kopf.on.event("", "v1", "pods", labels=CHILDREN)
def pod_event(namespace: str, labels: dict, memo: kopf.Memo, **_: object) -> None:
    handlers.on_child(namespace, labels, memo)


def cli() -> None:
    """Run the operator (standalone: one active replica, the Deployment uses the Recreate strategy)."""
    parser = argparse.ArgumentParser(prog="dpo-operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="watch only these (repeatable)")
    parser.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    kopf.configure(verbose=args.verbose)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(namespaces=args.namespace),
    )
