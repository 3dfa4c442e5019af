"""The Argo CD health check in docs/ runs in a real Lua interpreter and maps DPOJob status correctly."""

from pathlib import Path

import pytest
from lupa import LuaRuntime

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "gitops" / "argocd-health-dpojob.lua"


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
