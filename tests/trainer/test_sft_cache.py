"""SFT models shared between runs (dpo_trainer.sft_cache): the identity, the lock, the atomic publish, and the
pipeline skipping SFT for a model another run trained (or waiting while it trains)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dpo_trainer import pipeline, sft_cache
from dpo_trainer.context import RunContext
from dpo_trainer.pipeline import STAGES
from dpo_trainer.progress import Reporter
from dpo_trainer.sft_cache import SharedSFT, sft_identity
from dpo_trainer.specfile import load_job
from dpo_trainer.training import dpo_input
from dpojob_api.progress import ProgressEvent
from dpojob_api.spec import DPOJobSpec, digest, training_hash
from dpojob_api.vocabulary import Stage

from .conftest import QUICKSTART, TINY_DATA, deep_merge, quickstart_job

LOCAL = {"model": {"name": "./examples/assets/tiny-llama", "local": True}, "datasets": []}


def hub_spec(**overrides: Any) -> DPOJobSpec:
    """The seed recipe (a Hub model and dataset) with overrides."""
    raw = deep_merge({"output": {"directory": "/output/m"}, "model": {"name": "org/base"}}, overrides)
    return DPOJobSpec.model_validate(raw)


def provenance_of(spec: DPOJobSpec, model_sha: str | None = "a" * 40, data_sha: str | None = "b" * 40) -> dict:
    """The provenance of spec's base model (at its revision) and data, resolved to these commits."""
    return {
        "model": {"name": spec.model.name, "revision": spec.model.revision or "main", "sha": model_sha},
        "datasets": [{"name": "lvwerra/stack-exchange-paired", "revision": "main", "sha": data_sha}],
    }


def identity_digest(spec: DPOJobSpec, provenance: dict[str, Any] | None = None) -> str:
    identity = sft_identity(spec, provenance_of(spec) if provenance is None else provenance)
    assert identity is not None
    return digest(identity)


SFT_DECIDING: dict[str, dict[str, Any]] = {
    "base model revision": {"model": {"revision": "v2"}},
    "model dtype": {"model": {"dtype": "float16"}},
    "SFT template": {"data": {"sft": {"textTemplate": "Q: {question}\nA: {response_j}"}}},
    "SFT eval rows": {"data": {"sft": {"evalSize": 10}}},
    "SFT data dir": {"data": {"sft": {"source": {"hub": {"name": "lvwerra/stack-exchange-paired", "dataDir": "x"}}}}},
    "maxSamples": {"data": {"maxSamples": 100}},
    "SFT learning rate": {"sft": {"learningRate": 2e-4}},
    "SFT steps": {"sft": {"maxSteps": 600}},
    "SFT LoRA rank": {"sft": {"lora": {"r": 16}}},
    "quantization": {"quantization": {"quantType": "fp4"}},
    "seed": {"seed": 1},
}
NOT_SFT: dict[str, dict[str, Any]] = {
    "DPO beta": {"dpo": {"beta": 0.5}},
    "DPO loss type": {"dpo": {"lossType": ["ipo"]}},
    "DPO LoRA": {"dpo": {"lora": {"r": 32}}},
    "DPO templates": {"data": {"dpo": {"promptTemplate": "Q: {question}\n"}}},
    "output": {"output": {"directory": "/output/other", "hub": {"repoId": "me/x"}}},
    "runtime": {"runtime": {"memory": "80Gi", "checkpointVolume": {"claimName": "c"}}},
    "checkpointing": {"checkpointing": {"saveSteps": 7}},
    "SFT stop rules": {"sft": {"stopRules": [{"name": "r", "metric": "loss", "comparison": ">", "threshold": 9}]}},
    "SFT reuse": {"sft": {"reuse": False}},
}


@pytest.mark.parametrize("change", SFT_DECIDING)
def test_what_decides_the_sft_model_changes_its_identity(change: str) -> None:
    assert identity_digest(hub_spec(**SFT_DECIDING[change])) != identity_digest(hub_spec())
    other_base = hub_spec(model={"name": "org/other"})
    assert identity_digest(other_base) != identity_digest(hub_spec()), "same commits, another repository"


@pytest.mark.parametrize("change", NOT_SFT)
def test_what_only_dpo_or_the_output_reads_keeps_the_identity(change: str) -> None:
    assert identity_digest(hub_spec(**NOT_SFT[change])) == identity_digest(hub_spec())


def test_a_moving_branch_gives_a_new_identity_and_an_unresolved_one_none() -> None:
    """The same spec on another commit of the base model or the SFT data is another SFT model; a revision the Hub
    did not resolve cannot be told apart, so it is not shared."""
    spec = hub_spec()
    assert identity_digest(spec, provenance_of(spec, model_sha="c" * 40)) != identity_digest(spec)
    assert identity_digest(spec, provenance_of(spec, data_sha="d" * 40)) != identity_digest(spec)
    assert sft_identity(spec, provenance_of(spec, model_sha=None)) is None
    assert sft_identity(spec, provenance_of(spec, data_sha=None)) is None
    assert sft_identity(hub_spec(sft={"enabled": False}), provenance_of(spec)) is None


def test_local_files_count_by_their_content(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_bytes(TINY_DATA.read_bytes())
    spec = load_job(QUICKSTART).spec
    spec.data.sft.source.files.paths = [str(data)]  # type: ignore[union-attr]
    before = identity_digest(spec, LOCAL)
    assert identity_digest(spec, LOCAL) == before, "stable"
    data.write_bytes(TINY_DATA.read_bytes() + b"\n")
    assert identity_digest(spec, LOCAL) != before


def test_reuse_and_the_lock_change_no_training_fingerprint() -> None:
    """sft.reuse says where the SFT model may come from: the work directory and every training stage's inputs stay
    (the card, which prints the spec, is rendered again, as for a stop rule's edit)."""
    raw = quickstart_job()["spec"]
    off = DPOJobSpec.model_validate(deep_merge(raw, {"sft": {"reuse": False}}))
    on = DPOJobSpec.model_validate(raw)
    assert training_hash(off) == training_hash(on)
    changed = [stage.name for (stage, a), (_, b) in zip(pipeline.plan(off), pipeline.plan(on), strict=True) if a != b]
    assert changed == ["model_card"]


# -- the lock and the publish ----------------------------------------------------------------------------------


def shared(cache: Path, owner: str, work_dir: Path | None = None) -> SharedSFT:
    return SharedSFT(cache, "0123456789abcdef", {"format": 1}, owner, work_dir or cache.parent / owner)


def test_of_two_runs_one_takes_the_lock_and_the_other_waits_for_it(tmp_path: Path) -> None:
    first, second = shared(tmp_path, "ns/a"), shared(tmp_path, "ns/b")
    assert first.claim() == "trained"
    waited_for: list[str] = []

    def stop_waiting(owner: str) -> None:
        waited_for.append(owner)
        raise TimeoutError

    with pytest.raises(TimeoutError):
        second.claim(on_wait=stop_waiting)
    assert waited_for == ["ns/a"]
    assert first.holds_lock() and not second.holds_lock()
    first.release()


def test_a_stale_lock_is_taken_over_by_one_waiter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner died (its heartbeat stopped): after STALE_SECONDS a waiter takes over; of two, one."""
    monkeypatch.setattr(sft_cache, "POLL_SECONDS", 0.01)
    dead = shared(tmp_path, "ns/dead")
    assert dead.try_lock()
    old = time.time() - sft_cache.STALE_SECONDS - 5
    os.utime(dead.lock, (old, old))
    record = dead.read_lock()
    assert record is not None
    first, second = shared(tmp_path, "ns/a"), shared(tmp_path, "ns/b")
    assert first.take_over(record[0]) and not second.take_over(record[0])
    assert first.holds_lock() and not dead.holds_lock()
    first.release()
    assert first.read_lock() is None


def test_a_fresh_lock_is_not_taken_over_but_one_of_the_same_run_is(tmp_path: Path) -> None:
    """A lock touched by its heartbeat stays; the lock of an earlier pod of this very run (same work directory) is
    this run's to take at once."""
    owner = shared(tmp_path, "ns/a", tmp_path / "work-a")
    assert owner.claim() == "trained"
    owner.release()
    assert owner.try_lock()
    again = shared(tmp_path, "ns/a", tmp_path / "work-a")  # the retried pod: same work directory
    assert again.claim() == "trained" and again.holds_lock()
    again.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sft_cache, "HEARTBEAT_SECONDS", 0.05)
    owner = shared(tmp_path, "ns/a")
    assert owner.claim() == "trained"
    old = time.time() - 1000
    os.utime(owner.lock, (old, old))
    time.sleep(0.3)
    found = owner.read_lock()
    assert found is not None and found[1] < 10
    owner.release()


def merged_model(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def test_publish_is_all_or_nothing_and_links_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = merged_model(tmp_path / "work" / "sft_merge")
    owner = shared(tmp_path / "cache", "ns/a")
    owner.cache.mkdir()
    assert owner.claim() == "trained"

    def copy_then_fail(src: str, dst: str) -> None:
        if dst.endswith("model.safetensors"):
            raise OSError("disk full")
        Path(dst).write_bytes(Path(src).read_bytes())

    monkeypatch.setattr(sft_cache, "_link_or_copy", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        owner.publish(model)
    assert not owner.entry.exists() and owner.published_origin() is None, "nothing half-published"
    monkeypatch.undo()
    owner.publish(model)
    assert owner.published_origin() == "ns/a"
    origin = json.loads((owner.entry / sft_cache.ORIGIN_FILE).read_text())
    assert (origin["digest"], origin["trainedBy"], origin["identity"]) == (owner.digest, "ns/a", {"format": 1})
    assert (owner.entry / "model.safetensors").stat().st_ino == (model / "model.safetensors").stat().st_ino
    assert owner.read_lock() is None, "published: the lock is gone"
    assert shared(owner.cache, "ns/b").claim() == "reused"


# -- the pipeline ----------------------------------------------------------------------------------------------


def _stub(ran: list[str], gate: threading.Event | None, name: str, ctx: RunContext) -> None:
    ran.append(name)
    if name == "sft" and gate is not None:
        gate.wait(30)
    if name == "sft_merge":
        merged_model(ctx.layout.sft_model)
    if name == "dpo":
        (ctx.layout.stage_dir(Stage.DPO) / "trained-on").write_text(dpo_input(ctx)[0])


def run_stubbed(
    spec: DPOJobSpec, out_dir: Path, cache: Path | None, name: str, gate: threading.Event | None = None
) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """pipeline.run with stubbed stages (sft waits for `gate`): the stages that ran, the events, the summary."""
    ran: list[str] = []
    stream = io.StringIO()
    summary = pipeline.run(spec, out_dir, Reporter(stream), None, {"name": name, "namespace": "ns"}, cache)
    events = [ProgressEvent.model_validate_json(line).model_dump() for line in stream.getvalue().splitlines()]
    return ran, events, summary


@pytest.fixture
def stubbed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The stage table with stubs recording, per thread, which stages ran."""
    record: dict[str, Any] = {"ran": {}, "gate": None}

    def stub(name: str, ctx: RunContext) -> None:
        _stub(record["ran"].setdefault(ctx.metadata["name"], []), record["gate"], name, ctx)

    table = tuple(dataclasses.replace(stage, run=functools.partial(stub, stage.name)) for stage in STAGES)
    monkeypatch.setattr(pipeline, "STAGES", table)
    monkeypatch.setattr("dpo_trainer.hub.check_token", lambda ctx: None)
    monkeypatch.setattr(sft_cache, "POLL_SECONDS", 0.02)
    return record


def sft_events(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["source"], e["origin"]) for e in events if e["event"] == "sft_model"]


def test_a_second_run_with_the_same_sft_reuses_it_and_trains_only_dpo(tmp_path: Path, stubbed: dict) -> None:
    spec = load_job(QUICKSTART).spec
    other_beta = spec.model_copy(deep=True)
    other_beta.dpo.beta = 0.5
    cache = tmp_path / "sft-cache"
    _, first_events, first = run_stubbed(spec, tmp_path / "a", cache, "a")
    _, second_events, second = run_stubbed(other_beta, tmp_path / "b", cache, "b")
    assert stubbed["ran"]["a"][:3] == ["data", "sft", "sft_merge"]
    assert stubbed["ran"]["b"] == ["data", "dpo_data", "dpo", "dpo_merge", "model_card"]
    assert sft_events(first_events) == [("trained", "ns/a")]
    assert sft_events(second_events) == [("reused", "ns/a")]
    entry = cache / first["sftModel"]["digest"]
    assert (tmp_path / "b" / "dpo" / "trained-on").read_text() == str(entry)
    assert second["sftModel"] == {"digest": entry.name, "source": "reused", "from": "ns/a", "path": str(entry)}
    assert {e["stage"] for e in second_events if e["event"] == "stage_end" and e["skipped"]} == {"sft", "sft_merge"}


def test_without_a_cache_or_with_reuse_off_nothing_is_shared(tmp_path: Path, stubbed: dict) -> None:
    spec = load_job(QUICKSTART).spec
    cache = tmp_path / "sft-cache"
    run_stubbed(spec, tmp_path / "a", cache, "a")
    _, events, summary = run_stubbed(spec, tmp_path / "b", None, "b")
    assert "sftModel" not in summary and not sft_events(events)
    own = spec.model_copy(deep=True)
    own.sft.reuse = False
    _, events, summary = run_stubbed(own, tmp_path / "c", cache, "c")
    assert stubbed["ran"]["c"][:3] == ["data", "sft", "sft_merge"] and not sft_events(events)


def test_two_runs_started_together_train_sft_once_the_second_waiting_visibly(tmp_path: Path, stubbed: dict) -> None:
    spec = load_job(QUICKSTART).spec
    other_loss = spec.model_copy(deep=True)
    other_loss.dpo.loss_type = ["ipo"]
    cache = tmp_path / "sft-cache"
    stubbed["gate"] = gate = threading.Event()
    results: dict[str, Any] = {}
    first = threading.Thread(target=lambda: results.update(a=run_stubbed(spec, tmp_path / "a", cache, "a")))
    first.start()
    deadline = time.monotonic() + 30
    while "sft" not in stubbed["ran"].get("a", []) and time.monotonic() < deadline:
        time.sleep(0.02)
    second = threading.Thread(target=lambda: results.update(b=run_stubbed(other_loss, tmp_path / "b", cache, "b")))
    second.start()
    time.sleep(0.5)  # b is waiting on a's lock
    assert "dpo" not in stubbed["ran"].get("b", [])
    gate.set()
    first.join(30)
    second.join(30)
    assert sft_events(results["a"][1]) == [("trained", "ns/a")]
    assert sft_events(results["b"][1]) == [("waiting", "ns/a"), ("reused", "ns/a")]
    assert "sft" not in stubbed["ran"]["b"] and "dpo" in stubbed["ran"]["b"]


def test_a_run_that_fails_in_sft_lets_the_waiting_one_train(tmp_path: Path, stubbed: dict) -> None:
    """The owner's failure removes its lock: the next run trains SFT itself (no wait for the lock to go stale)."""
    spec = load_job(QUICKSTART).spec

    def failing(name: str, ctx: RunContext) -> None:
        raise RuntimeError("SFT crashed")

    table = tuple(dataclasses.replace(s, run=functools.partial(failing, s.name)) if s.name == "sft" else s
                  for s in pipeline.STAGES)  # fmt: skip
    cache = tmp_path / "sft-cache"
    with pytest.MonkeyPatch.context() as patch, contextlib.suppress(RuntimeError):
        patch.setattr(pipeline, "STAGES", table)
        run_stubbed(spec, tmp_path / "a", cache, "a")
    assert not list(cache.glob("*.lock"))
    _, events, _ = run_stubbed(spec, tmp_path / "b", cache, "b")
    assert sft_events(events) == [("trained", "ns/b")]


def test_the_card_says_which_sft_model_dpo_started_from() -> None:
    from dpo_trainer.card import sft_model_line

    reused = {"digest": "0123456789abcdef", "source": "reused", "from": "ns/a", "path": "/c/0123456789abcdef"}
    assert sft_model_line(reused) == (
        "\n- SFT model: `0123456789abcdef` (reused from ns/a; SFT identity in `/c/0123456789abcdef/origin.json`)"
    )
    assert "trained by this run" in sft_model_line({**reused, "source": "trained"})
    assert sft_model_line(None) == ""
