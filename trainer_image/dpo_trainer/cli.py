"""`dpo-trainer run SPEC.yaml [--output DIR] [--sft-cache CACHE] [--nproc N]`: the trainer pod's entrypoint, also
runnable on a laptop.

SPEC.yaml is the very DPOJob a user applies with kubectl (multi-document files are fine; the DPOJob
document is used). Heavy libraries (torch, transformers, TRL) are imported by the stages that need them,
so `--help` and spec errors answer in well under a second.

Several GPUs: when the machine (pod) shows more than one CUDA device, the same command trains
data-parallel on all of them: once the spec has validated, it re-runs itself under torchrun with one
process per GPU (standalone rendezvous on localhost; NCCL between GPUs; see dpo_trainer.launch). Every
process loads its own 4-bit model on its own GPU and trains on its shard of each batch, so one optimizer
step consumes batchSize x gradientAccumulationSteps x GPUs examples (summary.json "parallelism" says how
many processes trained). Rank 0 alone prepares the data, merges, writes the card and pushes, and only
rank 0's progress events reach stdout; whichever rank fails, the command still ends with that failure's
reason code, one line and the termination message. `--nproc N` (or DPO_TRAINER_NPROC=N) overrides the
GPU count: `--nproc 1` trains on one GPU only, and on CPU `--nproc 2` runs two gloo processes of one
thread each (how the tests exercise this path). Under an existing torchrun or accelerate launch the CLI
launches nothing and trains as the rank it was given.

Environment:
    HF_TOKEN                      Hub token (gated models, private datasets, pushes); never printed
    HF_ENDPOINT                   Hub URL, honoured by huggingface_hub (default https://huggingface.co)
    DPO_TERMINATION_MESSAGE_PATH  where the final JSON goes (default /dev/termination-log; skipped if unwritable)
    DPO_TRAINER_NPROC             processes to train with, as --nproc (default: one per visible CUDA device)
    OMP_NUM_THREADS               CPU threads per process (default 1 when several processes train)

stdout carries only JSON progress events (see dpo_trainer.progress); everything human-readable,
including progress bars and library output, goes to stderr. Exit codes: see dpo_trainer.errors.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from dpo_trainer import launch, pipeline
from dpo_trainer.context import is_main_process, world_size
from dpo_trainer.errors import ALL_ERRORS, TrainerError, classify, one_line, scrub
from dpo_trainer.layout import RunLayout
from dpo_trainer.progress import Reporter, to_json_safe, write_termination_message
from dpo_trainer.specfile import parse_job, read_job, resolve_local_paths, run_metadata
from dpojob_api.progress import Done, TrainerFailed
from dpojob_api.vocabulary import Reason


def build_parser() -> argparse.ArgumentParser:
    codes = ", ".join(f"{e.reason}={e.exit_code}" for e in ALL_ERRORS)
    parser = argparse.ArgumentParser(
        prog="dpo-trainer",
        description="Align a language model with DPO (QLoRA SFT -> merge -> DPO -> merge -> card -> push).",
        epilog=f"Exit codes: 0 on success; {codes}.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run (or resume) a DPOJob",
        description="Run every stage of a DPOJob; a rerun with the same DIR skips finished stages and resumes "
        "the running one from its newest checkpoint.",
    )
    run.add_argument("spec", type=Path, metavar="SPEC.yaml", help="a DPOJob manifest (kind: DPOJob)")
    run.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="work directory for stages, checkpoints and summary.json (default: spec.checkpointing.directory)",
    )
    run.add_argument(
        "--sft-cache",
        type=Path,
        metavar="CACHE",
        help="share the merged SFT model with other runs through this directory: a run whose SFT identity was "
        "trained there skips SFT, one started while another trains it waits (spec.sft.reuse: false opts out)",
    )
    run.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help=f"train data-parallel in N processes, one per GPU (default: ${launch.NPROC_ENV}, "
        "else one per visible CUDA device); on CPU they use gloo",
    )
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def claim_stdout() -> TextIO:
    """Keep the real stdout for JSON events and route everything else written there to stderr.

    Libraries print to stdout (tqdm.write of Trainer logs, print calls, native code), which would
    break the one-JSON-object-per-line contract the operator parses.
    """
    try:
        sys.stdout.flush()
        events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return sys.stdout
    sys.stdout = sys.stderr
    return events


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM while no Trainer exists (a Trainer's own, checkpointing handler is installed from its construction to
    the end of its training; see docs/trainer.md, Resume).

    A KeyboardInterrupt, not an Exception, so no library's `except Exception` swallows it on the way up.
    """
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}; rerun with the same output directory to resume")


def report_outcome(payload: dict[str, Any], secrets: tuple[str, ...]) -> None:
    """The termination message; a worker of our own launch hands it to the launcher, which picks the root cause."""
    path = launch.outcome_path()
    if path is None:
        write_termination_message(payload, secrets)
    else:
        launch.write_outcome(path, payload, secrets)


def fail(
    error: TrainerError, exc: BaseException, reporter: Reporter, out_dir: Path | None, secrets: tuple[str, ...]
) -> int:
    """One clear line on stderr, an error event, the termination message, the traceback in DIR/debug.log."""
    message = one_line(scrub(error.message, secrets))
    where = ""
    prog = f"dpo-trainer[rank {os.environ.get('RANK', '0')}]" if world_size() > 1 else "dpo-trainer"
    wraps_a_library_error = exc.__cause__ is not None or not isinstance(exc, TrainerError | KeyboardInterrupt)
    if out_dir is not None and out_dir.is_dir() and wraps_a_library_error:
        log = RunLayout(out_dir).debug_log
        try:
            with log.open("a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {prog} {error.reason}\n")
                f.write(scrub("".join(traceback.format_exception(exc)), secrets))
            where = f" (traceback in {log})"
        except OSError:
            pass
    print(f"{prog}: {error.reason}: {message}{where}", file=sys.stderr, flush=True)
    if launch.outcome_path() is None:  # else the launcher emits the launch's one error event
        reporter.emit(TrainerFailed(reason=error.reason, message=message))
    stage = {"stage": reporter.stage} if reporter.stage else {}
    report_outcome({"reason": error.reason, "message": message, **stage}, secrets)
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    """Run the command; once its outcome is reported, a late SIGTERM is ignored.

    torchrun stops the other ranks with SIGTERM once one has failed, often while they are already exiting: a
    KeyboardInterrupt raised inside interpreter shutdown (torch's atexit finalizers) would print a traceback after
    the one-line failure.
    """
    try:
        return _run(argv)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    token = os.environ.get("HF_TOKEN") or None
    secrets = (token,) if token else ()
    # stdout is claimed only where the pipeline runs: a launcher's workers must inherit the real one.
    reporter = Reporter(sys.stdout, enabled=is_main_process(), secrets=secrets)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    out_dir: Path | None = None
    started = time.monotonic()
    try:
        document = read_job(args.spec)
        job = parse_job(document)
        spec = resolve_local_paths(job.spec)
        out_dir = (args.output or Path(spec.checkpointing.directory)).expanduser().absolute()
        sft_cache = args.sft_cache.expanduser().absolute() if args.sft_cache else None
        nproc = launch.processes(args.nproc, spec.runtime.gpus)
        if nproc > 1:
            shared = ["--sft-cache", str(sft_cache)] if sft_cache else []
            write_termination_message(
                launch.run_workers(nproc, ["run", str(args.spec), "--output", str(out_dir), *shared]), secrets
            )
            return 0
        reporter.stream = claim_stdout()
        summary = pipeline.run(spec, out_dir, reporter, token, run_metadata(document, job), sft_cache)
    except (Exception, KeyboardInterrupt) as exc:
        return fail(classify(exc), exc, reporter, out_dir, secrets)
    reporter.emit(Done(summary=to_json_safe(summary)))
    if not is_main_process():
        return 0
    metrics = summary["metrics"]
    report_outcome(
        {"reason": Reason.SUCCEEDED.value, "metrics": pipeline.key_metrics(metrics), "model": summary["model"]}, secrets
    )
    shown = ", ".join(
        f"{k}={metrics[k]:.4g}" for k in ("rewards/accuracies", "rewards/margins", "loss") if k in metrics
    )
    print(
        f"dpo-trainer: done in {time.monotonic() - started:.0f}s: {shown}; model in {summary['model']['directory']}",
        file=sys.stderr,
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
