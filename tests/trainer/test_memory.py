"""Memory between stages: every stage starts with the previous stage's models, trainers and tensors freed (the real
pipeline, in this process, on the tiny model), and the GPU reading's arithmetic."""

from __future__ import annotations

import dataclasses
import gc
import io
from pathlib import Path
from typing import Any

import pytest

from dpo_trainer import memory, pipeline
from dpo_trainer.context import RunContext
from dpo_trainer.progress import Reporter
from dpo_trainer.specfile import load_job, resolve_local_paths
from dpojob_api.spec import OutputSpec

from .conftest import QUICKSTART, REPO

GIB = 2**30


def _live() -> dict[int, Any]:
    """Every torch module and Trainer (by id: its class name) and CPU tensor storage (by address: its bytes) the
    garbage collector still tracks: cyclic garbage counts until something collects it."""
    import torch
    from transformers import Trainer

    found: dict[int, Any] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module | Trainer):
            found[id(obj)] = type(obj).__name__
        elif isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            found[storage.data_ptr()] = storage.nbytes()
    return found


def test_each_stage_starts_with_what_the_previous_one_loaded_freed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sft → sft_merge → dpo → dpo_merge in one process: at the start of each, no model, Trainer or tensor that an
    earlier stage created is still there, not even as uncollected garbage (on CUDA the same release then empties
    the allocator's cache)."""
    monkeypatch.chdir(REPO)
    spec = resolve_local_paths(load_job(QUICKSTART).spec)
    spec = spec.model_copy(update={"output": OutputSpec(directory=str(tmp_path / "model"))})
    spec.sft.max_steps = spec.dpo.max_steps = 2
    gc.collect()
    before = _live()
    left_over: dict[str, list[Any]] = {}

    def watched(stage: pipeline.Stage) -> pipeline.Stage:
        def run(ctx: RunContext) -> None:
            left_over[stage.name] = [v for k, v in _live().items() if k not in before]
            stage.run(ctx)

        return dataclasses.replace(stage, run=run)

    monkeypatch.setattr(pipeline, "STAGES", tuple(watched(stage) for stage in pipeline.STAGES))
    pipeline.run(spec, tmp_path / "work", Reporter(io.StringIO()), None, {})
    assert list(left_over) == ["data", "sft", "sft_merge", "dpo_data", "dpo", "dpo_merge", "model_card"]
    for stage, new in left_over.items():
        assert not [v for v in new if isinstance(v, str)], f"alive at the start of {stage}"
        # bitsandbytes keeps its 4-bit code tables (tens of bytes each) for the process: no model weights
        assert sum(v for v in new if isinstance(v, int)) < 1024, f"tensors alive at the start of {stage}"


def test_a_stage_reading_reports_its_own_peaks(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter(
        [
            {"allocated": 3 * GIB // 2, "peak_allocated": 2 * GIB, "peak_reserved": 2 * GIB},
            {"allocated": GIB, "peak_allocated": 9 * GIB, "peak_reserved": 10 * GIB + GIB // 4},
        ]
    )
    monkeypatch.setattr(memory, "cuda_reading", lambda: next(readings))
    used = memory.StageMemory()
    used.start()
    assert used.result() == {"allocated_at_start_gib": 1.5, "peak_allocated_gib": 9.0, "peak_reserved_gib": 10.25}
    assert memory.as_metrics({"peak_allocated_gib": 9.0}) == {"gpu/peak_allocated_gib": 9.0}


def test_without_cuda_there_is_no_reading() -> None:
    used = memory.StageMemory()
    used.start()
    assert not memory.cuda_in_use() and used.result() == {} and memory.as_metrics(None) == {}
