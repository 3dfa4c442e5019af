"""The stage table, the stages' resumable bookkeeping, and the run summary.

    data → sft → sft_merge → dpo_data → dpo → dpo_merge → model_card → gates → push

STAGES is the table of the stages: their order (dpojob_api.vocabulary.Stage, which the operator reads, must
match it), what each runs and what invalidates it. Where each stage writes under the
work directory DIR: see dpo_trainer.layout. sft.enabled=false skips sft and sft_merge; gates runs only when
output.gates is set, push only when output.hub is.

summary.json "stages" maps each stage to {"seconds", "skipped"} and, on CUDA, "gpu" (its memory: see
dpo_trainer.memory); for a stage skipped because an earlier run finished it, these are what it took then (its
stage_end event reports 0 seconds for this run).
"parallelism" maps sft/dpo to {"worldSize", "backend", "globalBatchSize"}: processes that trained (one
per GPU), their collective backend (null for one process), and batchSize x gradientAccumulationSteps x
worldSize examples per optimizer step.

The stage modules import torch, transformers and TRL only inside their functions, so importing this table
(the CLI does, before the spec is validated) stays fast.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_trainer import card, data, gates, hub, memory, merge, models, preflight, provenance, sft_cache, training
from dpo_trainer.context import RunContext, RunState, fingerprint, is_main_process, wait_for_everyone
from dpo_trainer.layout import RunLayout, TrainingStage
from dpo_trainer.progress import Reporter
from dpo_trainer.specfile import spec_as_yaml_dict
from dpojob_api.progress import Preflight, StageEnd, StageStart
from dpojob_api.spec import DPOJobSpec, model_identity, without_rules
from dpojob_api.vocabulary import Stage

KEY_METRICS_PREFIXES = ("rewards/", "eval_", memory.GPU_METRIC_PREFIX)


def _always(spec: DPOJobSpec) -> bool:
    return True


@dataclass(frozen=True)
class PipelineStage:
    """One unit of work. `inputs` picks the spec parts whose change invalidates this stage (and later ones)."""

    name: Stage
    run: Callable[[RunContext], None]
    inputs: Callable[[dict[str, Any]], Any]
    enabled: Callable[[DPOJobSpec], bool] = _always
    main_only: bool = True  # data prep, merges and writes happen once; other ranks wait at the barrier


def _sft_enabled(spec: DPOJobSpec) -> bool:
    return spec.sft.enabled


STAGES: tuple[PipelineStage, ...] = (
    PipelineStage(
        name=Stage.DATA,
        run=data.run_sft_data,
        inputs=lambda s: [s["model"], s["data"], s["sft"]["enabled"], data.sft_inputs(DPOJobSpec.model_validate(s))],
    ),
    PipelineStage(
        name=Stage.SFT,
        run=training.run_sft,
        inputs=lambda s: [without_rules(s["sft"]), s["quantization"], s["seed"]],
        enabled=_sft_enabled,
        main_only=False,
    ),
    PipelineStage(name=Stage.SFT_MERGE, run=merge.run_sft_merge, inputs=lambda s: [], enabled=_sft_enabled),
    PipelineStage(
        name=Stage.DPO_DATA, run=data.run_dpo_data, inputs=lambda s: data.dpo_inputs(DPOJobSpec.model_validate(s))
    ),
    PipelineStage(
        name=Stage.DPO,
        run=training.run_dpo,
        inputs=lambda s: [without_rules(s["dpo"]), s["quantization"], s["seed"]],
        main_only=False,
    ),
    PipelineStage(name=Stage.DPO_MERGE, run=merge.run_dpo_merge, inputs=lambda s: [s["output"]["directory"]]),
    PipelineStage(name=Stage.MODEL_CARD, run=card.run, inputs=model_identity),
    PipelineStage(
        name=Stage.GATES,
        run=gates.run,
        inputs=lambda s: [s["output"]["gates"]],
        enabled=lambda spec: spec.output.gates is not None,
    ),
    PipelineStage(
        name=Stage.PUSH,
        run=hub.run,
        inputs=lambda s: [s["output"]["hub"]],
        enabled=lambda spec: spec.output.hub is not None,
    ),
)


def plan(spec: DPOJobSpec) -> list[tuple[PipelineStage, str]]:
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
    """What the termination message carries: rewards/*, loss, eval_* and, on CUDA, gpu/* (see dpo_trainer.memory)."""
    return {k: v for k, v in metrics.items() if k == "loss" or k.startswith(KEY_METRICS_PREFIXES)}


def model_location(ctx: RunContext) -> dict[str, Any]:
    """Where the model ended up: directory (output.directory, else DIR/model) and, once pushed, the commit."""
    location: dict[str, Any] = {"directory": str(ctx.model_directory)}
    if ctx.spec.output.hub is not None:
        location.update(ctx.read_json(ctx.layout.push_result) or {})
    return location


def build_summary(ctx: RunContext) -> dict[str, Any]:
    """DIR/summary.json and the `done` event: final metrics, stage timings, row counts, parallelism, model location,
    and the gates' verdict when output.gates is set."""
    trained: list[TrainingStage] = [Stage.SFT, Stage.DPO] if ctx.spec.sft.enabled else [Stage.DPO]
    verdict = {"gates": ctx.read_json(ctx.layout.gates_result)} if ctx.spec.output.gates else {}
    metrics = {stage: training.stage_metrics(ctx, stage) for stage in trained}
    return {
        "metrics": metrics[Stage.DPO],
        "sftMetrics": metrics.get(Stage.SFT, {}),
        "efficiency": provenance.efficiency(ctx, trained),
        "provenance": ctx.provenance,
        **({"sftModel": ctx.sft_source} if ctx.sft_source else {}),
        "parallelism": {stage: ctx.read_json(ctx.layout.parallelism(stage)) or {} for stage in trained},
        "stages": ctx.timings,
        "data": data.stats(ctx),
        "model": model_location(ctx),
        **verdict,
    }


def _gpu(record: dict[str, float] | None) -> dict[str, Any]:
    """A stage's GPU memory entry in state.json and summary.json "stages": present only when there is a reading."""
    return {"gpu": record} if record else {}


def run(
    spec: DPOJobSpec,
    out_dir: Path,
    reporter: Reporter,
    token: str | None,
    metadata: dict[str, Any],
    sft_cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) every enabled stage; return the summary also written to DIR/summary.json. With
    sft_cache_dir the merged SFT model is shared there with other runs (dpo_trainer.sft_cache)."""
    models.check_device(spec)  # before anything is written, downloaded or loaded
    preflight.check_writable(spec, out_dir)  # a read-only path fails now, not after the training
    layout = RunLayout(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(spec, layout, reporter, token, RunState.load(layout.state), metadata)
    wait_for_everyone()  # every rank has read state.json before the main process changes it
    if is_main_process():  # one whoami, not one per GPU; should it fail, the launcher stops the waiting ranks
        hub.check_sources(spec, token)  # a gated model or dataset not granted fails before config.json is read
        fit = preflight.check(spec, token)  # before anything large is downloaded: will it fit the GPU?
        reporter.emit(Preflight(estimates=fit["stages"], gpuMemoryGiB=fit.get("gpuMemoryGiB")))
        hub.check_token(ctx)
        ctx.provenance = provenance.record(ctx)
    shared = sft_cache.open_shared(ctx, sft_cache_dir)
    try:
        _run_stages(ctx, shared)
    finally:
        if shared is not None and is_main_process():
            shared.release()  # a run that stops before publishing lets a waiting one take over at once
    summary = build_summary(ctx)
    if is_main_process():
        layout.summary.write_text(json.dumps(summary, indent=2))
    return summary


def _run_stages(ctx: RunContext, shared: sft_cache.SharedSFT | None) -> None:
    """Every planned stage in order: skipped when done (or when a shared SFT model is reused), else run."""
    reporter = ctx.reporter
    for stage, chain in plan(ctx.spec):
        reporter.emit(StageStart(stage=stage.name))
        if shared is not None and stage.name == Stage.SFT:
            sft_cache.claim(ctx, shared)
        if shared is not None and shared.reused and stage.name in (Stage.SFT, Stage.SFT_MERGE):
            ctx.timings[stage.name] = {"seconds": 0.0, "skipped": True}
            reporter.emit(StageEnd(stage=stage.name, seconds=0.0, skipped=True))
            continue
        if ctx.state.is_done(stage.name, chain):
            done = ctx.state.stages[stage.name]
            ctx.timings[stage.name] = {"seconds": done.get("seconds", 0.0), "skipped": True, **_gpu(done.get("gpu"))}
            reporter.emit(StageEnd(stage=stage.name, seconds=0.0, skipped=True))
        else:
            _run_stage(ctx, stage, chain)
        if shared is not None and stage.name == Stage.SFT_MERGE and is_main_process():
            shared.publish(ctx.layout.sft_model)  # also when an earlier pod merged it and stopped before this


def _run_stage(ctx: RunContext, stage: PipelineStage, chain: str) -> None:
    """Run one stage from its newest checkpoint (or afresh when its inputs changed), and record it done."""
    reporter = ctx.reporter
    ctx.prepare_stage_dir(stage.name, wipe=not ctx.state.is_resumable(stage.name, chain))
    ctx.state.start(stage.name, chain, later=[s.name for s in STAGES[STAGES.index(stage) + 1 :]])
    started, used = time.monotonic(), memory.StageMemory()
    used.start()
    if is_main_process() or not stage.main_only:
        stage.run(ctx)
    wait_for_everyone()
    seconds, gpu = round(time.monotonic() - started, 3), _gpu(used.result())
    ctx.state.mark(stage.name, chain, "done", seconds=seconds, **gpu)
    ctx.timings[stage.name] = {"seconds": seconds, "skipped": False, **gpu}
    reporter.emit(StageEnd(stage=stage.name, seconds=seconds, skipped=False))
