"""Memory between stages: release what a finished stage held, and measure what each stage used on the GPU.

sft → sft_merge → dpo → dpo_merge run in one process, each loading its own model. Before every stage the
pipeline collects garbage (a Trainer, its accelerator and the PEFT model reference each other, so only the
collector frees them) and, on CUDA, empties torch's caching allocator and resets its peak counters, so each
stage starts from what is really live and its peaks are its own. The reading is this process's GPU (rank 0's
when several train).

A stage's reading is kept with the stage in DIR/state.json and summary.json "stages" as "gpu"
{allocated_at_start_gib, peak_allocated_gib, peak_reserved_gib}; in a training stage's final metrics the
same values appear as gpu/<name> (so DPO's reach the termination message and status.metrics), and the model
card lists every stage's. On CPU there is no reading and none of these keys.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

GPU_METRIC_PREFIX = "gpu/"
GIB = 2**30


def cuda_in_use() -> bool:
    """True once this process has initialised CUDA; never imports torch itself."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


def release() -> None:
    """Free what no stage references any more, hand the GPU's cached blocks back and restart its peak counters.

    What survives the collection (the imported libraries: half a million objects once torch, transformers and TRL
    are in) is then frozen: no later collection scans it again, neither ours (a full one over it takes a
    noticeable fraction of a second, per stage) nor the automatic ones during training. A stage's own objects
    are created after the freeze, so the next stage's collection still frees them.
    """
    gc.collect()
    gc.freeze()
    if cuda_in_use():
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def cuda_reading() -> dict[str, int] | None:
    """Bytes allocated now and the peaks since the last reset; None where CUDA is not in use."""
    if not cuda_in_use():
        return None
    import torch

    return {
        "allocated": torch.cuda.memory_allocated(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
    }


class StageMemory:
    """One stage's reading: `start()` releases and notes what is still allocated, `result()` adds the peaks."""

    def __init__(self) -> None:
        self.at_start = 0

    def start(self) -> None:
        release()
        reading = cuda_reading()
        self.at_start = reading["allocated"] if reading else 0

    def result(self) -> dict[str, float]:
        """The stage's "gpu" record, {} when CUDA was never used."""
        reading = cuda_reading()
        if reading is None:
            return {}
        return {
            "allocated_at_start_gib": round(self.at_start / GIB, 3),
            "peak_allocated_gib": round(reading["peak_allocated"] / GIB, 3),
            "peak_reserved_gib": round(reading["peak_reserved"] / GIB, 3),
        }


def as_metrics(record: dict[str, Any] | None) -> dict[str, float]:
    """A stage's "gpu" record as metric keys (gpu/peak_allocated_gib, ...)."""
    return {GPU_METRIC_PREFIX + name: value for name, value in (record or {}).items()}
