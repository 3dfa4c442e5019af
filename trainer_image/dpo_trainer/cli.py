"""`dpo-trainer run SPEC.yaml [--output DIR]`: the trainer pod's entrypoint, also runnable on a laptop.

SPEC.yaml is the very DPOJob a user applies with kubectl (multi-document files are fine; the DPOJob
document is used). Heavy libraries (torch, transformers, TRL) are imported by the stages that need them,
so `--help` and spec errors answer in well under a second.

Environment:
    HF_TOKEN                      Hub token (gated models, private datasets, pushes); never printed
    HF_ENDPOINT                   Hub URL, honoured by huggingface_hub (default https://huggingface.co)
    DPO_TERMINATION_MESSAGE_PATH  where the final JSON goes (default /dev/termination-log; skipped if unwritable)

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
from typing import TextIO

from dpo_trainer import pipeline
from dpo_trainer.context import is_main_process
from dpo_trainer.errors import ALL_ERRORS, TrainerError, classify, one_line, scrub
from dpo_trainer.progress import Reporter, write_termination_message
from dpo_trainer.specfile import load_job, resolve_local_paths, spec_as_yaml_dict


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
    return parser


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
    """SIGTERM outside training (the Trainer installs its own, checkpointing handler while it trains).

    A KeyboardInterrupt, not an Exception, so no library's `except Exception` swallows it on the way up.
    """
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}; rerun with the same output directory to resume")


def fail(
    error: TrainerError, exc: BaseException, reporter: Reporter, out_dir: Path | None, secrets: tuple[str, ...]
) -> int:
    """One clear line on stderr, an error event, the termination message, the traceback in DIR/debug.log."""
    message = one_line(scrub(error.message, secrets))
    where = ""
    wraps_a_library_error = exc.__cause__ is not None or not isinstance(exc, TrainerError | KeyboardInterrupt)
    if out_dir is not None and out_dir.is_dir() and wraps_a_library_error:
        log = out_dir / "debug.log"
        try:
            with log.open("a", encoding="utf-8") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {error.reason}\n")
                f.write(scrub("".join(traceback.format_exception(exc)), secrets))
            where = f" (traceback in {log})"
        except OSError:
            pass
    print(f"dpo-trainer: {error.reason}: {message}{where}", file=sys.stderr, flush=True)
    reporter.emit("error", reason=error.reason, message=message)
    write_termination_message({"reason": error.reason, "message": message}, secrets)
    return error.exit_code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = os.environ.get("HF_TOKEN") or None
    secrets = (token,) if token else ()
    reporter = Reporter(claim_stdout(), enabled=is_main_process(), secrets=secrets)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    out_dir: Path | None = None
    started = time.monotonic()
    try:
        job = load_job(args.spec)
        spec = resolve_local_paths(job.spec)
        out_dir = (args.output or Path(spec.checkpointing.directory)).expanduser().absolute()
        metadata = {"name": job.metadata.get("name", "model"), "given_spec": spec_as_yaml_dict(job.spec)}
        summary = pipeline.run(spec, out_dir, reporter, token, metadata)
    except (Exception, KeyboardInterrupt) as exc:
        return fail(classify(exc), exc, reporter, out_dir, secrets)
    reporter.emit("done", summary=summary)
    if not is_main_process():
        return 0
    metrics = summary["metrics"]
    write_termination_message(
        {"reason": "Succeeded", "metrics": pipeline.key_metrics(metrics), "model": summary["model"]}, secrets
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
