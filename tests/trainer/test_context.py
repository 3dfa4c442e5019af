"""Stage bookkeeping in state.json, and where each stage keeps its files."""

from __future__ import annotations

import json
from pathlib import Path

from dpo_trainer.context import RunState, fingerprint
from dpo_trainer.layout import STAGE_DIRECTORIES, RunLayout
from dpojob_api.vocabulary import Stage


def test_fingerprints_chain() -> None:
    a = fingerprint("", {"x": 1})
    assert a == fingerprint("", {"x": 1}) and a != fingerprint("", {"x": 2})
    assert fingerprint(a, []) != fingerprint(fingerprint("", {"x": 2}), [])  # earlier changes propagate


def test_state_round_trip(tmp_path: Path) -> None:
    path = RunLayout(tmp_path).state
    state = RunState.load(path)
    assert not state.is_done("data", "f1") and not state.is_resumable("data", "f1")
    state.mark("data", "f1", "done", seconds=1.5)
    state.mark("sft", "f2", "running")
    again = RunState.load(path)
    assert again.is_done("data", "f1") and not again.is_done("data", "other")
    assert again.is_resumable("sft", "f2") and not again.is_done("sft", "f2")
    assert not again.is_resumable("sft", "changed")
    assert json.loads(path.read_text())["stages"]["data"]["seconds"] == 1.5
    assert not path.with_suffix(".tmp").exists()


def test_starting_a_stage_forgets_the_later_ones(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    state = RunState.load(layout.state)
    for stage in ("data", "sft", "dpo"):
        state.mark(stage, f"fp-{stage}", "done")
    state.start("sft", "fp-sft-2", later=["sft_merge", "dpo"])
    again = RunState.load(layout.state)
    assert {k: v["status"] for k, v in again.stages.items()} == {"data": "done", "sft": "running"}
    assert again.is_resumable("sft", "fp-sft-2") and not again.is_done("dpo", "fp-dpo")


def test_every_stage_owns_a_directory_of_its_own(tmp_path: Path) -> None:
    """A stage whose inputs changed wipes its directory: it must hold nothing another stage made."""
    layout = RunLayout(tmp_path)
    assert list(STAGE_DIRECTORIES) == list(Stage)
    directories = [layout.stage_dir(stage) for stage in Stage]
    assert len(set(directories)) == len(directories) and all(d.parent == tmp_path for d in directories)
    assert layout.model == tmp_path / "model" and layout.stage_dir("dpo_merge") == layout.model
    for path in (layout.state, layout.summary, layout.debug_log):
        assert path.parent == tmp_path and path not in directories
