"""The stage sequence, its resumable bookkeeping, and the run summary.

    data → sft → sft_merge → dpo → dpo_merge → model_card → gates → push

Where each stage writes, under the work directory DIR:

    data        DIR/data/        rendered splits (save_to_disk) + stats.json
    sft         DIR/sft/         checkpoints, adapter/, log_history.json
    sft_merge   DIR/sft_merge/   base + SFT adapter merged, in model.dtype, with tokenizer
    dpo         DIR/dpo/         checkpoints, adapter/, log_history.json
    dpo_merge   DIR/model/       the final model + tokenizer (also copied to output.directory)
    model_card  DIR/model_card/  README.md + training_curves.png (also copied next to the model); with output.hub,
                                 target.json: what the card at the target revision records
    gates       DIR/gates/       result.json: every check of output.gates with its numbers, notes
    push        DIR/push/        result.json: repoId, revision, commitUrl, commitSha, tag

plus DIR/state.json (stage bookkeeping), DIR/summary.json and, after a failure, DIR/debug.log.
sft.enabled=false skips sft and sft_merge; gates runs only when output.gates is set, push only when
output.hub is.

summary.json "stages" maps each stage to {"seconds", "skipped"}; for a stage skipped because an earlier
run finished it, "seconds" is what it took then (its stage_end event reports 0 for this run).
"parallelism" maps sft/dpo to {"worldSize", "backend", "globalBatchSize"}: processes that trained (one
per GPU), their collective backend (null for one process), and batchSize x gradientAccumulationSteps x
worldSize examples per optimizer step.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_trainer.context import (
    STATE_FILE,
    SUMMARY_FILE,
    RunContext,
    RunState,
    fingerprint,
    is_main_process,
    wait_for_everyone,
)
from dpo_trainer.progress import Reporter
from dpo_trainer.specfile import spec_as_yaml_dict
from dpo_trainer.training import PARALLELISM, stage_metrics
from dpojob_api.spec import DPOJobSpec, model_identity

KEY_METRICS_PREFIXES = ("rewards/", "eval_")


def _always(spec: DPOJobSpec) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    """One unit of work. `inputs` picks the spec parts whose change invalidates this stage (and later ones)."""

    name: str
    directory: str
    target: str  # "module:function", imported only when the stage actually runs
    inputs: Callable[[dict[str, Any]], Any]
    enabled: Callable[[DPOJobSpec], bool] = _always
    main_only: bool = True  # data prep, merges and writes happen once; other ranks wait at the barrier

    def run(self, ctx: RunContext) -> None:
        module, _, function = self.target.partition(":")
        getattr(importlib.import_module(module), function)(ctx)


def _sft_enabled(spec: DPOJobSpec) -> bool:
    return spec.sft.enabled


STAGES: tuple[Stage, ...] = (
    Stage(
        name="data",
        directory="data",
        target="dpo_trainer.data:run",
        inputs=lambda s: [s["model"], s["data"], s["sft"]["enabled"], s["dpo"]["maxPromptLength"]],
    ),
    Stage(
        name="sft",
        directory="sft",
        target="dpo_trainer.training:run_sft",
        inputs=lambda s: [s["sft"], s["quantization"], s["seed"]],
        enabled=_sft_enabled,
        main_only=False,
    ),
    Stage(
        name="sft_merge",
        directory="sft_merge",
        target="dpo_trainer.merge:run_sft_merge",
        inputs=lambda s: [],
        enabled=_sft_enabled,
    ),
    Stage(
        name="dpo",
        directory="dpo",
        target="dpo_trainer.training:run_dpo",
        inputs=lambda s: [s["dpo"], s["quantization"], s["seed"]],
        main_only=False,
    ),
    Stage(
        name="dpo_merge",
        directory="model",
        target="dpo_trainer.merge:run_dpo_merge",
        inputs=lambda s: [s["output"]["directory"]],
    ),
    Stage(name="model_card", directory="model_card", target="dpo_trainer.card:run", inputs=model_identity),
    Stage(
        name="gates",
        directory="gates",
        target="dpo_trainer.gates:run",
        inputs=lambda s: [s["output"]["gates"]],
        enabled=lambda spec: spec.output.gates is not None,
    ),
    Stage(
        name="push",
        directory="push",
        target="dpo_trainer.hub:run",
        inputs=lambda s: [s["output"]["hub"]],
        enabled=lambda spec: spec.output.hub is not None,
    ),
)


def plan(spec: DPOJobSpec) -> list[tuple[Stage, str]]:
    """The enabled stages in order, each with its chained fingerprint."""
    spec_dict = spec_as_yaml_dict(spec)
    chain = ""
    planned = []
    for stage in STAGES:
        if stage.enabled(spec):
            chain = fingerprint(chain, stage.inputs(spec_dict))
            planned.append((stage, chain))
    return planned


def key_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What the termination message carries: rewards/*, loss and eval_*."""
    return {k: v for k, v in metrics.items() if k == "loss" or k.startswith(KEY_METRICS_PREFIXES)}


def model_location(ctx: RunContext) -> dict[str, Any]:
    """Where the model ended up: directory (output.directory, else DIR/model) and, once pushed, the commit."""
    location: dict[str, Any] = {"directory": ctx.spec.output.directory or str(ctx.out_dir / "model")}
    if ctx.spec.output.hub is not None:
        location.update(ctx.read_json("push", "result.json") or {})
    return location


def build_summary(ctx: RunContext) -> dict[str, Any]:
    """DIR/summary.json and the `done` event: final metrics, stage timings, row counts, parallelism, model location,
    and the gates' verdict when output.gates is set."""
    trained = ["sft", "dpo"] if ctx.spec.sft.enabled else ["dpo"]
    gates = {"gates": ctx.read_json("gates", "result.json")} if ctx.spec.output.gates else {}
    return {
        "metrics": stage_metrics(ctx, "dpo"),
        "sftMetrics": stage_metrics(ctx, "sft") if ctx.spec.sft.enabled else {},
        "parallelism": {stage: ctx.read_json(stage, PARALLELISM) or {} for stage in trained},
        "stages": ctx.timings,
        "data": ctx.read_json("data", "stats.json") or {},
        "model": model_location(ctx),
        **gates,
    }


def run(
    spec: DPOJobSpec,
    out_dir: Path,
    reporter: Reporter,
    token: str | None,
    metadata: dict[str, Any],
) -> dict[str, Any]:
    """Run (or resume) every enabled stage; return the summary also written to DIR/summary.json."""
    from dpo_trainer.hub import check_token

    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(spec, out_dir, reporter, token, RunState.load(out_dir / STATE_FILE), metadata)
    wait_for_everyone()  # every rank has read state.json before the main process changes it
    if is_main_process():  # one whoami, not one per GPU; should it fail, the launcher stops the waiting ranks
        check_token(ctx)
    for stage, chain in plan(spec):
        reporter.emit("stage_start", stage=stage.name)
        if ctx.state.is_done(stage.name, chain):
            ctx.timings[stage.name] = {"seconds": ctx.state.stages[stage.name].get("seconds", 0.0), "skipped": True}
            reporter.emit("stage_end", stage=stage.name, seconds=0.0, skipped=True)
            continue
        if not ctx.state.is_resumable(stage.name, chain):
            ctx.reset_stage_dir(stage.directory)
        ctx.state.start(stage.name, chain, later=[s.name for s in STAGES[STAGES.index(stage) + 1 :]])
        started = time.monotonic()
        if is_main_process() or not stage.main_only:
            stage.run(ctx)
        wait_for_everyone()
        seconds = round(time.monotonic() - started, 3)
        ctx.state.mark(stage.name, chain, "done", seconds=seconds)
        ctx.timings[stage.name] = {"seconds": seconds, "skipped": False}
        reporter.emit("stage_end", stage=stage.name, seconds=seconds, skipped=False)
    summary = build_summary(ctx)
    if is_main_process():
        (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary
