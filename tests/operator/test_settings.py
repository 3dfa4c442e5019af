"""Operator settings from the environment: the chart's contract, and one clear message for a bad value."""

from __future__ import annotations

import json

import pytest

from dpo_operator.settings import OperatorSettings, SettingsError

SECRET_VAR = {"name": "HTTPS_PROXY", "valueFrom": {"secretKeyRef": {"name": "proxy", "key": "url"}}}


def test_chart_environment_is_read() -> None:
    settings = OperatorSettings.from_env(
        {
            "DPO_OPERATOR_NAMESPACES": "team-a, team-b",
            "DPO_OPERATOR_RESYNC_SECONDS": "12.5",
            "DPO_OPERATOR_TRAINER_ENV": json.dumps([{"name": "HF_ENDPOINT", "value": "http://hub"}, SECRET_VAR]),
            "DPO_OPERATOR_LEADER_ELECTION": "true",
            "DPO_OPERATOR_LISTEN_ADDRESS": "10.0.0.7",
            "DPO_OPERATOR_TRAINER_CACHE_CLAIM": "hf-cache",
            "DPO_OPERATOR_PER_DPOJOB_SERIES": "false",
            "DPO_OPERATOR_DRAIN_SECONDS": "15",
            "POD_NAME": "dpo-operator-abc",
            "POD_NAMESPACE": "dpo-operator-system",
        }
    )
    assert settings.namespaces == ["team-a", "team-b"] and settings.resync_seconds == 12.5
    assert settings.trainer_env[1] == SECRET_VAR
    assert settings.leader_election and settings.identity.startswith("dpo-operator-abc_")
    assert settings.lease_namespace == "dpo-operator-system" and settings.listen_address == "10.0.0.7"
    assert settings.trainer_cache_claim == "hf-cache"
    assert settings.per_dpojob_series is False and settings.drain_seconds == 15
    assert OperatorSettings.from_env({}).per_dpojob_series, "per-DPOJob series are exported unless turned off"
    assert OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_CACHE_CLAIM": ""}).trainer_cache_claim is None


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"DPO_OPERATOR_RESYNC_SECONDS": "soon"}, "DPO_OPERATOR_RESYNC_SECONDS"),
        ({"DPO_OPERATOR_TRAINER_ENV": '{"A": "b"}'}, "DPO_OPERATOR_TRAINER_ENV"),
        ({"DPO_OPERATOR_TRAINER_ENV": '[{"name": "T", "value": 3}]'}, "secretKeyRef"),
        ({"DPO_OPERATOR_TRAINER_ENV": '[{"name": "T", "valueFrom": {"fieldRef": {}}}]'}, "secretKeyRef"),
        ({"DPO_OPERATOR_LEADER_ELECTION": "true"}, "POD_NAMESPACE"),
        ({"DPO_OPERATOR_TRAINER_CACHE_CLAIM": "HF_Cache"}, "DPO_OPERATOR_TRAINER_CACHE_CLAIM"),
        ({"DPO_OPERATOR_PER_DPOJOB_SERIES": "maybe"}, "DPO_OPERATOR_PER_DPOJOB_SERIES"),
        ({"DPO_OPERATOR_DRAIN_SECONDS": "-1"}, "DPO_OPERATOR_DRAIN_SECONDS"),
        (
            {"DPO_OPERATOR_LEADER_ELECTION": "true", "POD_NAMESPACE": "x", "DPO_OPERATOR_RENEW_DEADLINE": "20"},
            "LEASE_DURATION > RENEW_DEADLINE",
        ),
    ],
)
def test_bad_values_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        OperatorSettings.from_env(environ)


TRAINER_DEFAULTS = {
    "image": {"repository": "mirror.example/dpo/trainer", "tag": "", "digest": "", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "mirror-pull"}],
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"nvidia.com/gpu.present": "true"},
    "affinity": {},
    "priorityClassName": "training",
    "labels": {"team": "ml"},
    "annotations": {"cost-center": "42"},
}


def test_trainer_defaults_and_logging_are_read() -> None:
    settings = OperatorSettings.from_env(
        {
            "DPO_OPERATOR_TRAINER_DEFAULTS": json.dumps(TRAINER_DEFAULTS),
            "DPO_OPERATOR_LOG_FORMAT": "JSON",
            "DPO_OPERATOR_LOG_LEVEL": "warning",
        }
    )
    defaults = settings.trainer_defaults
    assert defaults.image.reference() == "mirror.example/dpo/trainer:0.1.0", "an empty tag: the API default's"
    assert defaults.image.pull_policy == "Always" and defaults.priority_class_name == "training"
    assert defaults.tolerations[0].effect == "NoSchedule" and defaults.node_selector == {
        "nvidia.com/gpu.present": "true"
    }
    assert defaults.labels == {"team": "ml"} and defaults.annotations == {"cost-center": "42"}
    assert (settings.log_format, settings.log_level, settings.effective_log_level) == ("json", "WARNING", "WARNING")

    unset = OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_DEFAULTS": "{}"})
    assert unset.trainer_defaults.image.reference() is None and unset.trainer_defaults.priority_class_name is None
    assert (unset.log_format, unset.effective_log_level) == ("text", "INFO")
    assert OperatorSettings.from_env({"DPO_OPERATOR_VERBOSE": "true"}).effective_log_level == "DEBUG"
    digest = "sha256:" + "ab" * 32
    pinned = OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_DEFAULTS": json.dumps({"image": {"digest": digest}})})
    assert pinned.trainer_defaults.image.reference() == f"ghcr.io/dpo-operator/trainer@{digest}"
    mirror = OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_DEFAULTS": '{"image": {"registry": "mirror.example"}}'})
    assert mirror.trainer_defaults.image.reference() == "mirror.example/dpo-operator/trainer:0.1.0"
    moved = {"image": {"registry": "mirror.example", "repository": "ml/trainer", "tag": "1.0"}}
    repository = OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_DEFAULTS": json.dumps(moved)})
    assert repository.trainer_defaults.image.reference() == "mirror.example/ml/trainer:1.0"


def test_the_start_up_line_shows_trainer_env_names_only() -> None:
    settings = OperatorSettings.from_env(
        {"DPO_OPERATOR_TRAINER_ENV": json.dumps([{"name": "HTTPS_PROXY", "value": "http://user:pass@proxy"}])}
    )
    shown = json.dumps(settings.loggable())
    assert "HTTPS_PROXY" in shown and "pass@proxy" not in shown


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ("{not json", r"DPO_OPERATOR_TRAINER_DEFAULTS: not JSON"),
        ("[]", r"DPO_OPERATOR_TRAINER_DEFAULTS: must be a JSON object"),
        ('{"image": {"pullPolicy": "Sometimes"}}', r"DPO_OPERATOR_TRAINER_DEFAULTS\.image\.pullPolicy"),
        ('{"image": {"digest": "sha256:short"}}', r"DPO_OPERATOR_TRAINER_DEFAULTS\.image\.digest"),
        ('{"tolerations": [{"effect": "Never"}]}', r"DPO_OPERATOR_TRAINER_DEFAULTS\.tolerations\[0\]\.effect"),
        ('{"nodeSelector": {"bad key!": "x"}}', r"nodeSelector: .*not a label key"),
        ('{"labels": {"app.kubernetes.io/managed-by": "me"}}', r"labels: app.kubernetes.io/managed-by: the operator"),
        ('{"labels": {"dpo-operator.io/dpojob": "x"}}', r"the operator sets these labels itself"),
        ('{"annotations": {"dpo-operator.io/dpojob-name": "x"}}', r"the operator sets these annotations itself"),
        ('{"priorityClassName": "High"}', r"DPO_OPERATOR_TRAINER_DEFAULTS\.priorityClassName"),
        ('{"env": []}', r"DPO_OPERATOR_TRAINER_DEFAULTS\.env: Extra inputs"),
    ],
)
def test_bad_trainer_defaults_name_the_key(defaults: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        OperatorSettings.from_env({"DPO_OPERATOR_TRAINER_DEFAULTS": defaults})


@pytest.mark.parametrize(
    ("variable", "value"), [("DPO_OPERATOR_LOG_FORMAT", "yaml"), ("DPO_OPERATOR_LOG_LEVEL", "TRACE")]
)
def test_bad_log_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        OperatorSettings.from_env({variable: value})
