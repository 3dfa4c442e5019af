"""The `model_card` stage: README.md with Hub front matter, metrics, the training spec, and a training plot.

Written to DIR/model_card/ and copied next to the weights (DIR/model and output.directory) so the
pushed folder is self-describing. The front matter records the run for the next one: the final DPO eval
metrics as the Hub's `model-index`, and `dpo_operator: {generation, spec_hash}`. With output.hub, the card
at the target revision is read first (RunLayout.target): the new card compares with its metrics, and the
`gates` stage's notWorseThanTarget reads the same file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from dpo_trainer import hub, provenance
from dpo_trainer.context import RunContext
from dpo_trainer.errors import scrub
from dpo_trainer.layout import PLOT_FILE, TrainingStage
from dpo_trainer.memory import GPU_METRIC_PREFIX
from dpo_trainer.specfile import looks_like_path
from dpo_trainer.training import stage_metrics
from dpojob_api.spec import NOT_ABOUT_THE_MODEL, model_identity
from dpojob_api.vocabulary import Stage

PLOTTED = ("rewards/margins", "rewards/accuracies")
RECORD = "dpo_operator"
"""Front-matter key of the run record; a card without it was not written by dpo-operator and is not compared."""
EVAL_TASK = "text-generation"


def plot_training_curves(history: list[dict[str, Any]], path: str) -> None:
    """Reward margins and accuracies over steps, train and eval, as a PNG (headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(10, 3.6), dpi=100)
    for ax, key in zip(axes, PLOTTED, strict=True):
        for prefix, style in (("", "-o"), ("eval_", "--s")):
            points = [(e["step"], e[prefix + key]) for e in history if e.get(prefix + key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, markersize=3, label="eval" if prefix else "train")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("DPO training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def hub_datasets(ctx: RunContext) -> list[str]:
    data = ctx.spec.data
    sources = [data.dpo.source, data.dpo.eval_source] if data.dpo else []
    if ctx.spec.sft.enabled and data.sft:
        sources.append(data.sft.source)
    return sorted({s.hub.name for s in sources if s is not None and s.hub is not None})


def metrics_table(metrics: dict[str, float]) -> str:
    """Train and eval side by side, rewards/* and loss first; throughput counters are left to summary.json, GPU
    memory to its own table."""
    names = {k.removeprefix("eval_") for k in metrics if not k.startswith(GPU_METRIC_PREFIX)}
    names -= {"runtime", "samples_per_second", "steps_per_second"}
    order = sorted(names, key=lambda k: (not k.startswith("rewards/"), k != "loss", k))

    def cell(key: str) -> str:
        value = metrics.get(key)
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = ["| metric | train | eval |", "|---|---|---|"]
    rows += [f"| {k} | {cell(k)} | {cell('eval_' + k)} |" for k in order]
    return "\n".join(rows)


def gpu_memory_table(records: dict[str, dict[str, float]]) -> str:
    """Each stage's GPU memory (dpo_trainer.memory): allocated when it started, peaks while it ran."""
    rows = ["| stage | allocated at start (GiB) | peak allocated (GiB) | peak reserved (GiB) |", "|---|---|---|---|"]
    rows += [
        f"| {stage} | {r['allocated_at_start_gib']:g} | {r['peak_allocated_gib']:g} | {r['peak_reserved_gib']:g} |"
        for stage, r in records.items()
    ]
    return "\n".join(rows)


def recorded_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The final eval metrics a card records for later runs to compare with: eval_loss and eval_rewards/*."""
    return {k: v for k, v in metrics.items() if k == "eval_loss" or k.startswith("eval_rewards/")}


def model_index(ctx: RunContext, name: str, metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The Hub's model-index (built by huggingface_hub) for the final DPO evaluation on its preference pairs."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    assert ctx.spec.data.dpo is not None
    source = ctx.spec.data.dpo.eval_source or ctx.spec.data.dpo.source
    if source.hub is not None:
        where = f" ({source.hub.data_dir})" if source.hub.data_dir else ""
        dataset: dict[str, Any] = {
            "dataset_type": source.hub.name,
            "dataset_name": source.hub.name + where,
            "dataset_config": source.hub.config,
            "dataset_split": source.hub.split,
        }
    else:
        assert source.files is not None
        loader = source.files.builder
        dataset = {"dataset_type": loader, "dataset_name": ", ".join(os.path.basename(p) for p in source.files.paths)}
    results = [
        EvalResult(
            task_type=EVAL_TASK,
            task_name="DPO preference pairs (eval split)",
            metric_type=key.removeprefix("eval_"),
            metric_name=key.replace("_", " ", 1),
            metric_value=value,
            **dataset,
        )
        for key, value in recorded_metrics(metrics).items()
    ]
    return eval_results_to_model_index(name, results)


def recorded_run(text: str) -> dict[str, Any]:
    """What a card written by this stage records: {"generation", "specHash", "metrics": {eval_*}}; {} otherwise."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(text, ignore_metadata_errors=True).data
    except (ValueError, yaml.YAMLError):
        return {}
    record = data.get(RECORD)
    if not isinstance(record, dict):
        return {}
    metrics = {
        f"eval_{r.metric_type}": float(r.metric_value)
        for r in getattr(data, "eval_results", None) or []  # ModelCardData's; CardData does not declare it
        if r.task_type == EVAL_TASK and isinstance(r.metric_value, int | float)
    }
    return {"generation": record.get("generation"), "specHash": record.get("spec_hash"), "metrics": metrics}


def read_target(ctx: RunContext) -> dict[str, Any]:
    """The model at output.hub's target revision and what its card records (commitSha None: nothing there yet)."""
    assert ctx.spec.output.hub is not None
    sha, text = hub.target_card(ctx)
    target = {"repoId": ctx.spec.output.hub.repo_id, "revision": ctx.spec.output.hub.revision or "main"}
    return {**target, "commitSha": sha, "card": text is not None, **(recorded_run(text) if text else {})}


def comparison_table(metrics: dict[str, float], target: dict[str, Any]) -> str:
    """This run's recorded eval metrics next to those of the model at the target revision."""
    previous = target.get("metrics") or {}
    rows = [f"| metric | this run | {target['revision']} before |", "|---|---|---|"]
    for key in sorted(recorded_metrics(metrics).keys() | previous.keys()):
        cells = [f"{m[key]:.4g}" if key in m else "" for m in (metrics, previous)]
        rows.append(f"| {key.replace('_', ' ', 1)} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


def run_line(ctx: RunContext) -> str:
    """Which run made the model: the DPOJob, its generation and the operator's spec hash (status.internal.specHash)."""
    parts = [f"DPOJob `{ctx.metadata.get('name', 'model')}`"]
    if ctx.metadata.get("generation") is not None:
        parts.append(f"generation {ctx.metadata['generation']}")
    if ctx.metadata.get("spec_hash"):
        parts.append(f"spec hash `{ctx.metadata['spec_hash']}`")
    return "Run: " + ", ".join(parts) + "."


def provenance_section(recorded: dict[str, Any], cost: dict[str, dict[str, float]]) -> str:
    """The exact inputs (revisions as commit SHAs, library versions) and what training took: with the spec below,
    enough to train the same model again."""
    lines = []
    model = recorded.get("model") or {}
    if model.get("local"):
        lines.append(f"- base model: `{model.get('name')}` (a local directory)")
    elif model:
        sha = f", commit `{model['sha']}`" if model.get("sha") else " (commit not resolved)"
        lines.append(f"- base model: `{model.get('name')}` at `{model.get('revision')}`{sha}")
    for dataset in recorded.get("datasets") or []:
        sha = f", commit `{dataset['sha']}`" if dataset.get("sha") else " (commit not resolved)"
        lines.append(f"- dataset: `{dataset['name']}` at `{dataset['revision']}`{sha}")
    if libraries := recorded.get("libraries"):
        lines.append("- libraries: " + ", ".join(f"{name} {version}" for name, version in libraries.items()))
    for stage, entry in cost.items():
        units = (("samplesPerSecond", "samples"), ("stepsPerSecond", "steps"))
        rates = "".join(f", {entry[key]:g} {unit}/s" for key, unit in units if key in entry)
        lines.append(f"- {stage}: {entry['seconds']:g} s, {entry['gpuHours']:g} GPU-hours{rates}")
    return "\n".join(lines) or "Not recorded."


def sft_model_line(shared: dict[str, Any] | None) -> str:
    """Which shared SFT model DPO started from (dpo_trainer.sft_cache), as a provenance line; "" when not shared."""
    if not shared:
        return ""
    how = "trained by this run" if shared.get("source") == "trained" else f"reused from {shared.get('from')}"
    return f"\n- SFT model: `{shared.get('digest')}` ({how}; SFT identity in `{shared.get('path')}/origin.json`)"


def render_card(
    ctx: RunContext,
    dpo_metrics: dict[str, float],
    sft_metrics: dict[str, float],
    target: dict[str, Any] | None = None,
    gpu_memory: dict[str, dict[str, float]] | None = None,
) -> str:
    """The README text; the spec is included verbatim (it holds no secrets: tokens come from a Secret), less the
    sections that do not shape the model, so editing those never calls for a new card and push. `target` (see
    read_target) adds a comparison with the model at the target revision, `gpu_memory` (stage → "gpu" record,
    on CUDA) a table of each stage's GPU memory."""
    spec = ctx.spec
    given = ctx.metadata.get("given_spec", {})
    model_name = given.get("model", {}).get("name", spec.model.name)
    front: dict[str, Any] = {}
    if not looks_like_path(spec.model.name):
        front["base_model"] = spec.model.name
        front["base_model_relation"] = "finetune"
    datasets = hub_datasets(ctx)
    if datasets:
        front["datasets"] = datasets
    front["library_name"] = "transformers"
    front["tags"] = ["trl", "dpo", "peft", "dpo-operator"] + (["sft", "qlora"] if spec.sft.enabled else [])
    name = ctx.metadata.get("name", "model")
    if recorded_metrics(dpo_metrics):
        front["model-index"] = model_index(ctx, spec.output.hub.repo_id if spec.output.hub else name, dpo_metrics)
    record = {"generation": ctx.metadata.get("generation"), "spec_hash": ctx.metadata.get("spec_hash")}
    front[RECORD] = {k: v for k, v in record.items() if v is not None}
    chain = "QLoRA SFT → merge → DPO (LoRA, reference = adapter disabled) → merge"
    if not spec.sft.enabled:
        chain = "DPO (LoRA, reference = adapter disabled) → merge"
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---",
        f"# {name}",
        f"`{model_name}` aligned with Direct Preference Optimization by dpo-operator: {chain}.",
        run_line(ctx),
        "## DPO results (final)",
        metrics_table(dpo_metrics) if dpo_metrics else "No metrics were logged.",
        f"![Reward margins and accuracies over training steps]({PLOT_FILE})",
    ]
    if target and target.get("metrics"):
        before = f", generation {target['generation']}" if target.get("generation") is not None else ""
        sections += [
            f"## Compared with `{target['revision']}` before this push",
            f"`{target['repoId']}` at `{target['revision']}` (commit `{target['commitSha'][:12]}`{before}), "
            "final DPO evaluation:",
            comparison_table(dpo_metrics, target),
        ]
    if sft_metrics:
        sections += ["## SFT results (final)", metrics_table(sft_metrics)]
    if gpu_memory:
        sections += ["## GPU memory", gpu_memory_table(gpu_memory)]
    trained: list[TrainingStage] = [Stage.SFT, Stage.DPO] if spec.sft.enabled else [Stage.DPO]
    recorded = provenance_section(ctx.provenance, provenance.efficiency(ctx, trained))
    sections += ["## Provenance", recorded + sft_model_line(ctx.sft_source)]
    spec_yaml = yaml.safe_dump(model_identity(given), sort_keys=False)
    sections += [
        "## Training spec",
        f"Left out, as they do not shape the model: {', '.join(NOT_ABOUT_THE_MODEL)}.",
        f"```yaml\n{spec_yaml}```",
    ]
    return scrub("\n\n".join(sections) + "\n", ctx.secrets)


def run(ctx: RunContext) -> None:
    layout = ctx.layout
    plot_training_curves(ctx.read_json(layout.log_history(Stage.DPO)) or [], str(layout.plot))
    sft_metrics = stage_metrics(ctx, Stage.SFT) if ctx.spec.sft.enabled else {}
    target = read_target(ctx) if ctx.spec.output.hub is not None else None
    if target is not None:
        ctx.write_json(layout.target, target)
    recorded = {stage.value: ctx.state.stages.get(stage, {}).get("gpu") for stage in Stage}
    gpu_memory = {stage: record for stage, record in recorded.items() if record}
    card = render_card(ctx, stage_metrics(ctx, Stage.DPO), sft_metrics, target, gpu_memory)
    layout.card.write_text(card, encoding="utf-8")
    folders = [layout.model] + ([Path(ctx.spec.output.directory)] if ctx.spec.output.directory else [])
    for folder in folders:
        for written in (layout.card, layout.plot):
            shutil.copy2(written, folder / written.name)
