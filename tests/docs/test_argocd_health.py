"""The Argo CD health check in docs/ runs in a real Lua interpreter and maps DPOJob status correctly."""

from pathlib import Path

import pytest
import yaml
from lupa import LuaRuntime

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT / "docs" / "gitops" / "argocd" / "dpo-operator.io" / "DPOJob"
"""argo-cd's resource_customizations layout: health.lua, health_test.yaml and testdata/."""
SCRIPT = CHECK / "health.lua"


def health(obj: dict) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value):
        if isinstance(value, dict):
            return lua.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([to_lua(v) for v in value])
        return value

    lua.globals().obj = to_lua(obj)
    result = lua.execute(SCRIPT.read_text())
    return result["status"], result["message"]


def dpojob(generation: int = 2, **status) -> dict:
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"metadata": {"generation": 1}}, "Progressing"),
        (dpojob(observedGeneration=1, phase="Succeeded"), "Progressing"),
        (dpojob(observedGeneration=2, phase="Succeeded", model={"commitUrl": "http://hub/c/1"}), "Healthy"),
        (dpojob(observedGeneration=2, phase="Failed"), "Degraded"),
        (dpojob(observedGeneration=2, phase="Suspended"), "Suspended"),
        (dpojob(observedGeneration=2, phase="Running", stage="dpo", progress={"percent": 60}), "Progressing"),
    ],
)
def test_phase_maps_to_health(obj: dict, expected: str) -> None:
    assert health(obj)[0] == expected


def test_messages_explain() -> None:
    ready = {"type": "Ready", "status": "False", "reason": "OutOfMemory", "message": "raise memory"}
    status, message = health(dpojob(observedGeneration=2, phase="Failed", conditions=[ready]))
    assert status == "Degraded" and message == "OutOfMemory: raise memory"
    running = dpojob(observedGeneration=2, phase="Running", stage="dpo", progress={"percent": 60}, conditions=[ready])
    assert health(running)[1].startswith("Stage dpo, 60%")
    assert health(dpojob(observedGeneration=2, phase="Succeeded", model={"commitUrl": "u"}))[1].endswith(": u")


def test_every_phase_has_its_health() -> None:
    """The script maps each vocabulary.Phase (a phase added to the API must be added to the health check)."""
    from dpojob_api.vocabulary import Phase

    expected = {
        Phase.PENDING: "Progressing",
        Phase.RUNNING: "Progressing",
        Phase.SUCCEEDED: "Healthy",
        Phase.FAILED: "Degraded",
        Phase.SUSPENDED: "Suspended",
    }
    assert set(expected) == set(Phase)
    model = {"commitUrl": "u"}
    for phase, health_status in expected.items():
        assert health(dpojob(observedGeneration=2, phase=phase.value, model=model))[0] == health_status, phase
    script = SCRIPT.read_text()
    assert all(f'"{phase}"' in script for phase in set(Phase) - {Phase.PENDING, Phase.RUNNING})


def health_test_cases() -> list[dict]:
    return yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]


@pytest.mark.parametrize("case", health_test_cases(), ids=[c["inputPath"] for c in health_test_cases()])
def test_upstream_health_test_cases(case: dict) -> None:
    """Each case of health_test.yaml, as argo-cd's own test runs it: the Lua on the testdata object gives the expected
    status, and the expected message where the case names one."""
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    status, message = health(obj)
    expected = case["healthStatus"]
    assert status == expected["status"]
    if "message" in expected:
        assert message == expected["message"]


def test_upstream_layout_is_complete_and_its_testdata_are_dpojobs() -> None:
    """Every testdata file is a case, every phase has one, and each is a DPOJob the API accepts."""
    from dpojob_api.spec import DPOJob
    from dpojob_api.vocabulary import Phase

    cases = health_test_cases()
    assert {c["inputPath"] for c in cases} == {f"testdata/{p.name}" for p in (CHECK / "testdata").glob("*.yaml")}
    assert all(
        set(c) == {"healthStatus", "inputPath"} and set(c["healthStatus"]) <= {"status", "message"} for c in cases
    )
    phases = set()
    for case in cases:
        obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
        phases.add(obj.get("status", {}).get("phase"))
        DPOJob.model_validate({k: v for k, v in obj.items() if k != "status"})
    assert {p.value for p in Phase} <= phases
