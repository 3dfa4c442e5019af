"""The operator's settings, read once from the environment (the Helm chart sets every one of them).

One pydantic model, so a bad value stops the operator at start with a message naming the variable instead
of surfacing later as a reconcile error.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from dpojob_api.spec import (
    LABEL_KEY,
    K8sName,
    LabelValue,
    LocalObjectReference,
    RuntimeSpec,
    SpecModel,
    Toleration,
)

from .manifests import OWN_ANNOTATION_KEYS, OWN_LABEL_KEYS

ENV_PREFIX = "DPO_OPERATOR_"


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot run with."""


class TrainerImage(SpecModel):
    """The chart value trainerDefaults.image: the trainer image of DPOJobs that name none (spec.runtime.image)."""

    registry: str = Field("", pattern=r"^([A-Za-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)*)?$")
    """A registry (mirror) to pull from, e.g. registry.example.com: it replaces the registry of the API's default
    image, or is put before repository (the chart's global.imageRegistry when empty)."""
    repository: str = ""
    """Empty: the repository of the API's default image (only registry, tag or digest changes)."""
    tag: str = Field("", pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")
    """Empty: the tag of the API's default image (the trainer this operator was built with)."""
    digest: str = Field("", pattern=r"^(sha256:[a-f0-9]{64})?$")
    """When set, the image is repository@digest and tag is ignored."""
    pull_policy: Literal["", "Always", "IfNotPresent", "Never"] = ""
    """The imagePullPolicy of DPOJobs that set no spec.runtime.imagePullPolicy; empty: the API's default."""

    def reference(self) -> str | None:
        """The image these values name, or None when they name nothing (the API's default image applies)."""
        if not (self.registry or self.repository or self.tag or self.digest):
            return None
        builtin = RuntimeSpec.model_fields["image"].default
        name, _, builtin_tag = builtin.rpartition(":")
        repository = self.repository or name
        if self.registry:  # the default image's path (after its registry, ghcr.io), or repository, on the mirror
            repository = f"{self.registry}/{self.repository or name.partition('/')[2]}"
        return f"{repository}@{self.digest}" if self.digest else f"{repository}:{self.tag or builtin_tag}"


class TrainerDefaults(SpecModel):
    """Cluster-wide defaults of trainer pods (the chart's trainerDefaults, but cacheClaimName): each applies only
    where the DPOJob's spec.runtime sets nothing for it (the DPOJob wins). Labels and annotations are merged into
    the pod's, the DPOJob's and the operator's own keys winning."""

    image: TrainerImage = Field(default_factory=TrainerImage)
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    tolerations: list[Toleration] = Field(default_factory=list)
    node_selector: dict[str, LabelValue] = Field(default_factory=dict)
    affinity: dict[str, Any] = Field(default_factory=dict)
    priority_class_name: K8sName | None = None
    labels: dict[str, LabelValue] = Field(default_factory=dict)
    """Extra labels of trainer pods."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Extra annotations of trainer pods."""

    @field_validator("priority_class_name", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @field_validator("node_selector", "labels", "annotations")
    @classmethod
    def _keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not LABEL_KEY.fullmatch(key) or len(key.partition("/")[0]) > 253:
                raise ValueError(f"{key!r} is not a label key (optional DNS prefix and '/', then up to 63 characters)")
        return value

    @field_validator("labels")
    @classmethod
    def _not_ours(cls, value: dict[str, str]) -> dict[str, str]:
        if taken := sorted(OWN_LABEL_KEYS & value.keys()):
            raise ValueError(f"{', '.join(taken)}: the operator sets these labels itself (it selects its pods by them)")
        return value

    @field_validator("annotations")
    @classmethod
    def _annotations_not_ours(cls, value: dict[str, str]) -> dict[str, str]:
        if taken := sorted(OWN_ANNOTATION_KEYS & value.keys()):
            raise ValueError(f"{', '.join(taken)}: the operator sets these annotations itself")
        return value


class OperatorSettings(BaseModel):
    """Operator-wide settings; field `x` comes from DPO_OPERATOR_X (see the chart's deployment template)."""

    namespaces: list[str] = Field(default_factory=list)
    """Namespaces to manage (comma-separated in the env); empty: cluster-wide."""
    resync_seconds: float = Field(30.0, gt=0)
    """How often every DPOJob is re-examined (TTL expiry, missed events)."""
    workers: int = Field(8, ge=1)
    """Reconcile worker threads (see workqueue.py)."""
    trainer_env: list[dict[str, Any]] = Field(default_factory=list)
    """Extra env for every trainer pod: Kubernetes EnvVar objects (a value, or valueFrom a Secret/ConfigMap key)."""
    trainer_cache_claim: K8sName | None = None
    """PVC (in each DPOJob's namespace) mounted as the Hugging Face cache of trainer pods whose DPOJob names no
    spec.runtime.cacheVolume (the chart value trainerDefaults.cacheClaimName; empty: none)."""
    trainer_defaults: TrainerDefaults = Field(default_factory=TrainerDefaults)
    """Defaults of trainer pods where the DPOJob sets nothing (the chart's other trainerDefaults, as JSON)."""
    listen_address: str = "0.0.0.0"
    """Where /healthz, /readyz and /metrics are served (the chart value listenAddress)."""
    port: int = Field(8080, ge=0, le=65535)
    per_dpojob_series: bool = True
    """Export the metrics labelled by DPOJob namespace and name (the chart value metrics.perDPOJobSeries); off on
    clusters where those who can scrape /metrics should not see other tenants' DPOJobs."""
    drain_seconds: float = Field(15.0, ge=0)
    """On a clean stop, how long the reconciles in flight may take to end before the Lease is released anyway
    (the chart renders half its terminationGracePeriodSeconds)."""
    leader_election: bool = False
    """Only the holder of a coordination.k8s.io Lease reconciles; other replicas wait as standbys."""
    lease_name: str = "dpo-operator"
    lease_namespace: str = ""
    """Defaults to POD_NAMESPACE."""
    lease_duration: int = Field(15, ge=2)
    renew_deadline: int = Field(10, ge=2)
    retry_period: int = Field(2, ge=1)
    identity: str = ""
    """This process's name in the Lease: POD_NAME (else the host name) plus a random suffix, so a container
    restarted in the same pod is a new candidate and cannot pass for the leader it replaced (as
    controller-runtime does)."""
    verbose: bool = False
    """Debug logging, whatever log_level says."""
    log_format: Literal["text", "json"] = "text"
    """text: one readable line per record; json: one JSON object per line (the chart value logFormat)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """The chart value logLevel (case does not matter); verbose means DEBUG."""

    @property
    def effective_log_level(self) -> str:
        return "DEBUG" if self.verbose else self.log_level

    def loggable(self) -> dict[str, Any]:
        """The settings for the start-up log line: trainer_env by variable names only (their values may be
        credentials, e.g. a proxy URL with a password)."""
        shown = self.model_dump(mode="json", exclude={"trainer_env"})
        shown["trainer_env"] = [var["name"] for var in self.trainer_env]
        shown["trainer_defaults"] = self.trainer_defaults.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return shown

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_case(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("trainer_defaults", mode="before")
    @classmethod
    def _parse_trainer_defaults(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object (the chart's trainerDefaults)")
        return value

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [n.strip() for n in value.split(",") if n.strip()]
        return value

    @field_validator("trainer_cache_claim", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @field_validator("trainer_env", mode="before")
    @classmethod
    def _parse_trainer_env(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value or "[]")
        if not isinstance(value, list):
            raise ValueError("must be a JSON list of Kubernetes EnvVar objects ({name, value} or {name, valueFrom})")
        for var in value:
            _check_env_var(var)
        return value

    @model_validator(mode="after")
    def _election_timing(self) -> OperatorSettings:
        # client-go's rules: the leader gives up (renew deadline) before anyone may take over (lease duration).
        if self.leader_election and not self.lease_duration > self.renew_deadline > 1.2 * self.retry_period:
            raise ValueError("leader election needs LEASE_DURATION > RENEW_DEADLINE > 1.2 * RETRY_PERIOD")
        return self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from DPO_OPERATOR_* (plus POD_NAME / POD_NAMESPACE for the Lease)."""
        environ = os.environ if environ is None else environ
        names = {name: ENV_PREFIX + name.upper() for name in cls.model_fields}
        raw: dict[str, Any] = {name: environ[var] for name, var in names.items() if var in environ}
        raw.setdefault("identity", f"{environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}")
        raw.setdefault("lease_namespace", environ.get("POD_NAMESPACE", ""))
        try:
            settings = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(_problem(error) for error in exc.errors(include_url=False))
            raise SettingsError(problems) from None
        if settings.leader_election and not settings.lease_namespace:
            raise SettingsError(f"{ENV_PREFIX}LEASE_NAMESPACE (or POD_NAMESPACE) is needed for leader election")
        return settings


def _problem(error: Any) -> str:
    """One validation error, naming the variable and, inside a JSON value, the key: DPO_OPERATOR_X.a.b: why."""
    variable, *inside = error["loc"] or ("",)
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in inside)
    return f"{ENV_PREFIX}{str(variable).upper()}{where}: {error['msg'].removeprefix('Value error, ')}"


def _check_env_var(var: Any) -> None:
    """One EnvVar as the API server would accept it: a name and either a string value or one valueFrom source."""
    if not isinstance(var, dict) or not isinstance(var.get("name"), str) or not var["name"]:
        raise ValueError(f"{var!r}: each entry needs a non-empty string 'name'")
    if set(var) - {"name", "value", "valueFrom"}:
        raise ValueError(f"{var['name']}: only name, value and valueFrom are allowed")
    if "valueFrom" in var:
        source = var["valueFrom"]
        if "value" in var or not isinstance(source, dict) or len(source) != 1:
            raise ValueError(f"{var['name']}: valueFrom needs exactly one source and no value")
        kind, ref = next(iter(source.items()))
        if kind not in ("secretKeyRef", "configMapKeyRef") or not isinstance(ref, dict):
            raise ValueError(f"{var['name']}: valueFrom supports secretKeyRef and configMapKeyRef")
        if not all(isinstance(ref.get(k), str) and ref[k] for k in ("name", "key")):
            raise ValueError(f"{var['name']}: {kind} needs a string name and key")
    elif not isinstance(var.get("value", ""), str):
        raise ValueError(f"{var['name']}: value must be a string (a secret goes in valueFrom.secretKeyRef)")
