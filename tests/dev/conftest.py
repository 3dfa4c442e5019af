"""Fixtures for tests that talk to a local Hub through the real huggingface_hub client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dpo_dev.hub import LocalHub

HUB_TOKEN = "hf_local_test_token"
HUB_USER = "tester"


@pytest.fixture
def hub_client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Configure huggingface_hub in this process to talk to a local Hub over plain HTTP.

    huggingface_hub parses its environment at import time, so the parsed constants are patched too: Xet
    uploads off (the server speaks LFS), offline mode off (it blocks localhost as well), and no stored token or
    shared cache leaking in from the developer's machine. Subprocesses inherit the patched environment.
    """
    from huggingface_hub import constants

    env = {
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


@pytest.fixture
def local_hub(tmp_path: Path, hub_client_env: None) -> Iterator[LocalHub]:
    """A fresh LocalHub accepting HUB_TOKEN (user HUB_USER) on a free port; the client is set up to reach it."""
    with LocalHub(tmp_path / "hub-root", {HUB_TOKEN: HUB_USER}) as hub:
        yield hub


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.2)


def allowed(call: Callable[[], Any]) -> bool:
    """Whether the API server lets the caller do `call` (False on 403; other errors raise)."""
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as exc:
        if exc.status != 403:
            raise
        return False
    return True
