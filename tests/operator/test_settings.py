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
