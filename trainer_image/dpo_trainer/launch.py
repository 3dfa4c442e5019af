"""Several GPUs in one pod: the CLI launches one worker process per GPU itself and trains data-parallel.

The operator's pod runs exactly `dpo-trainer run SPEC --output DIR`, so the CLI decides, once the spec has
validated: with more than one visible CUDA device (or `--nproc N` / DPO_TRAINER_NPROC=N, which also work on
CPU, where the workers talk over gloo) it re-runs itself under torch.distributed.run (torchrun, standalone
rendezvous on localhost) and waits. The workers train SFT and DPO with DDP, each keeping its own (4-bit)
copy of the model on its own GPU; rank 0 alone prepares data, merges, writes the card, pushes and prints
progress events (pipeline.PipelineStage.main_only).

The launcher keeps the pod's contract, whichever rank fails: its workers leave their outcome in
$DPO_TRAINER_OUTCOME_DIR/rank-<r>.json instead of the termination message, and the launcher writes the
termination message itself, rank 0's on success, the root cause's on failure (see root_cause), with that
reason's exit code, the one `error` event and the last stderr line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_trainer.errors import ALL_ERRORS, Interrupted, InvalidSpec, TrainerError, TrainingError, scrub
from dpo_trainer.progress import to_json_safe
from dpojob_api.vocabulary import Reason

NPROC_ENV = "DPO_TRAINER_NPROC"
OUTCOME_DIR_ENV = "DPO_TRAINER_OUTCOME_DIR"
"""Set by the launcher for its workers only: the directory where each rank leaves its outcome."""

_ERRORS: dict[str, type[TrainerError]] = {e.reason: e for e in ALL_ERRORS}


def in_distributed_launch() -> bool:
    """Already a worker of torchrun or accelerate launch (ours or the user's): train here, launch nothing."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def processes(requested: int | None, spec_gpus: int) -> int:
    """Worker processes to run: --nproc, else $DPO_TRAINER_NPROC, else one per visible CUDA device up to the spec's
    runtime.gpus (a spec asking for no GPU trains in one CPU process, whatever the host shows).

    Counting GPUs imports torch (seconds), so the CLI asks only once the spec has validated.
    """
    if in_distributed_launch():
        return 1
    if requested is None and os.environ.get(NPROC_ENV):
        value = os.environ[NPROC_ENV]
        if not value.isdigit() or int(value) < 1:
            raise InvalidSpec(f"{NPROC_ENV} must be a positive integer, not {value!r}")
        requested = int(value)
    if requested == 1 or (requested is None and spec_gpus == 0):
        return 1
    import torch

    gpus = torch.cuda.device_count()
    if requested is None:
        return max(min(gpus, spec_gpus), 1)
    if gpus and requested > gpus:
        raise InvalidSpec(f"{requested} processes asked for, but only {gpus} CUDA devices are visible (one per GPU)")
    return requested


@dataclass(frozen=True)
class Report:
    """What a worker left for the launcher: its termination message, and when it wrote it."""

    rank: int
    time: float
    termination: dict[str, Any]

    @property
    def reason(self) -> str:
        return str(self.termination.get("reason", Reason.TRAINING_ERROR))


@dataclass(frozen=True)
class Exit:
    """A worker that exited non-zero, as torchrun saw it (timestamp in whole seconds)."""

    code: int
    timestamp: int


def outcome_path() -> Path | None:
    """Where this worker of our launch reports; None outside one (the process writes the termination message)."""
    directory = os.environ.get(OUTCOME_DIR_ENV)
    return Path(directory) / f"rank-{os.environ.get('RANK', '0')}.json" if directory else None


def write_outcome(path: Path, termination: dict[str, Any], secrets: tuple[str, ...]) -> None:
    """Atomically, so the launcher never reads half a report; unwritable means the launcher sees a bare exit code."""
    record = {"time": time.time(), "termination": to_json_safe(termination)}
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_text(scrub(json.dumps(record, allow_nan=False), secrets))
        tmp.replace(path)


def read_outcomes(directory: Path) -> dict[int, Report]:
    reports = {}
    for path in directory.glob("rank-*.json"):
        record = json.loads(path.read_text())
        rank = int(path.stem.removeprefix("rank-"))
        reports[rank] = Report(rank, record["time"], record["termination"])
    return reports


def _died(code: int) -> str:
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (often the out-of-memory killer)" if code == -signal.SIGKILL else ""
    return f"was killed by {name}{hint}"


def root_cause(reports: dict[int, Report], exits: dict[int, Exit]) -> TrainerError:
    """The one failure to report when workers failed.

    Once a worker dies, torchrun stops the others (SIGTERM, SIGKILL 30 s later). On their way out they report
    Interrupted, die of that SIGTERM, or first fail in a collective whose peer vanished: that last report is
    a consequence, written just after the death that caused it. So a worker that died without a report
    (a crash, the out-of-memory killer), unless by the launcher's SIGTERM, is the cause when it died no later
    than about the earliest report of a failure (torchrun stamps exits in whole seconds); else that
    earliest report is; else the workers were only interrupted.
    """
    own = sorted(
        (r for r in reports.values() if r.reason not in (Reason.SUCCEEDED, Reason.INTERRUPTED)), key=lambda r: r.time
    )
    crashed = sorted(
        (rank for rank, e in exits.items() if rank not in reports and e.code != -signal.SIGTERM),
        key=lambda rank: (exits[rank].timestamp, rank),
    )
    if crashed and (not own or exits[crashed[0]].timestamp <= own[0].time + 1):
        rank = crashed[0]
        return TrainingError(f"rank {rank} {_died(exits[rank].code)} before reporting a reason; see its output above")
    if own:
        first = own[0]
        return _ERRORS.get(first.reason, TrainingError)(f"rank {first.rank}: {first.termination.get('message', '')}")
    return interrupted(reports)


def interrupted(reports: dict[int, Report]) -> Interrupted:
    """Interrupted, in rank 0's words when it reported it (it says whether a checkpoint was saved)."""
    first = min((r for r in reports.values() if r.reason == Reason.INTERRUPTED), key=lambda r: r.rank, default=None)
    message = first.termination.get("message") if first else None
    return Interrupted(message or "the launcher was stopped; rerun with the same output directory to resume")


def run_workers(nproc: int, worker_args: list[str]) -> dict[str, Any]:
    """Run `python -m dpo_trainer.cli WORKER_ARGS` as nproc torchrun workers; return rank 0's termination message.

    Raises root_cause(...) when a worker fails or the launcher is signalled (torchrun forwards the signal).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several workers, minus its banner
    outcomes = Path(tempfile.mkdtemp(prefix="dpo-trainer-ranks-"))
    os.environ[OUTCOME_DIR_ENV] = str(outcomes)
    launch = ["--standalone", f"--nproc-per-node={nproc}", "--module", "dpo_trainer.cli", *worker_args]
    exits: dict[int, Exit] | None = None
    signalled = False
    try:
        run(get_args_parser().parse_args(launch))
    except ChildFailedError as exc:
        exits = {rank: Exit(f.exitcode, f.timestamp) for rank, f in exc.failures.items()}
    except SignalException:  # the pod is being stopped: torchrun has passed the signal on to the workers
        signalled = True
    finally:
        del os.environ[OUTCOME_DIR_ENV]
        reports = read_outcomes(outcomes)
        shutil.rmtree(outcomes, ignore_errors=True)
    if signalled:
        raise interrupted(reports)
    if exits is not None:
        raise root_cause(reports, exits)
    return reports[0].termination if 0 in reports else {"reason": Reason.SUCCEEDED.value}
