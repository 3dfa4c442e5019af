"""What every stage shares: the spec, the work directory, the reporter, the token, and resumable state.

DIR/state.json records, per stage, the fingerprint of the spec parts the stage (and every stage before
it) depends on, and whether it finished. A rerun skips a finished stage whose fingerprint still
matches, resumes a started one from its newest checkpoint, and starts over (wiping the stage's
directory) when the spec parts it depends on have changed. A stage that runs drops the records of every
later stage, whose outputs were built on what it produced before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_trainer.layout import RunLayout
from dpo_trainer.progress import Reporter
from dpojob_api.spec import DPOJobSpec
from dpojob_api.vocabulary import Stage

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

STAGE_BARRIER_TIMEOUT = timedelta(hours=24)
"""How long ranks wait for rank 0 between stages: preparing a large dataset, merging or pushing a big model
takes far longer than a collective's usual timeout. Kubernetes' activeDeadlineSeconds bounds a stuck job."""
DEFAULT_GROUP_TIMEOUT = timedelta(minutes=30)
"""Timeout of the training collectives: what TrainingArguments.ddp_timeout would have given."""


def is_main_process() -> bool:
    """Rank 0 of a torchrun/accelerate launch (RANK is set by both), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    """Processes in this launch (WORLD_SIZE, set by torchrun and accelerate launch); 1 when alone."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@cache
def _stage_barrier_group() -> ProcessGroup:
    """A gloo group for the waits between stages, on top of the default group the Trainer trains with.

    accelerate's own barrier is not usable here: before the Trainer exists, PartialState() on CPU sets up no
    distributed state and its barrier silently does nothing. A CPU barrier with its own long timeout also
    keeps the idle GPUs idle and clear of NCCL's watchdog while rank 0 works alone.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # accelerate (and so the Trainer) reuses an initialized default group
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend, timeout=DEFAULT_GROUP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=STAGE_BARRIER_TIMEOUT)


def wait_for_everyone() -> None:
    """Barrier between ranks; a no-op for a single process (and cheap: no torch import when alone)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier(group=_stage_barrier_group())


def fingerprint(previous: str, part: Any) -> str:
    """Chain hash: a stage's fingerprint changes when its own inputs or any earlier stage's change."""
    blob = json.dumps(part, sort_keys=True, default=str).encode()
    return hashlib.sha256(previous.encode() + blob).hexdigest()[:16]


@dataclass
class RunState:
    """Stage bookkeeping persisted in DIR/state.json (written by the main process only)."""

    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunState:
        if path.exists():
            return cls(path, json.loads(path.read_text()).get("stages", {}))
        return cls(path)

    def is_done(self, stage: str, fp: str) -> bool:
        entry = self.stages.get(stage, {})
        return entry.get("status") == "done" and entry.get("fingerprint") == fp

    def is_resumable(self, stage: str, fp: str) -> bool:
        """Started before with the same inputs: its checkpoints are valid to resume from."""
        return self.stages.get(stage, {}).get("fingerprint") == fp

    def start(self, stage: str, fp: str, later: list[str]) -> None:
        """Mark a stage running and forget every later stage: their records describe outputs built from what this
        stage produced before, so a later run with those very inputs must not skip them."""
        for name in later:
            self.stages.pop(name, None)
        self.mark(stage, fp, "running")

    def mark(self, stage: str, fp: str, status: str, **extra: Any) -> None:
        self.stages[stage] = {"fingerprint": fp, "status": status, "updated": time.time(), **extra}
        if is_main_process():
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"stages": self.stages}, indent=2))
            tmp.replace(self.path)


@dataclass
class RunContext:
    """Everything a stage needs; stages read their inputs from earlier stages' paths in `layout`."""

    spec: DPOJobSpec
    layout: RunLayout
    reporter: Reporter
    token: str | None
    state: RunState
    metadata: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    """What the model came from (dpo_trainer.provenance): resolved revisions and library versions."""
    sft_model: Path | None = None
    """The merged SFT model DPO trains on when it is not this run's own (reused from dpo_trainer.sft_cache)."""
    sft_source: dict[str, Any] | None = None
    """Where the SFT model came from when it is shared (sft_cache.SharedSFT.status): summary.json, the card."""

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.token,) if self.token else ()

    @property
    def model_directory(self) -> Path:
        """Where users find the final model: output.directory when set, else DIR/model."""
        return Path(self.spec.output.directory) if self.spec.output.directory else self.layout.model

    def prepare_stage_dir(self, stage: Stage, *, wipe: bool) -> None:
        """Give a stage its directory; `wipe` drops what it holds (its inputs changed: no stale checkpoint is
        resumed). Every rank waits until the main process has done it."""
        path = self.layout.stage_dir(stage)
        if is_main_process():
            if wipe and path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        wait_for_everyone()

    def read_json(self, path: Path) -> Any:
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, path: Path, payload: Any) -> None:
        if is_main_process():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2, default=str))
