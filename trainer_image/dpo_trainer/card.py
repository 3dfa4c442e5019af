"""The `model_card` stage: README.md with Hub front matter, metrics, the training spec, and a training plot.

Written to DIR/model_card/ and copied next to the weights (DIR/model and output.directory) so the
pushed folder is self-describing.
"""

from __future__ import annotations

import shutil
from typing import Any

import yaml

from dpo_operator.spec import NOT_ABOUT_THE_MODEL, model_identity
from dpo_trainer.context import RunContext
from dpo_trainer.errors import scrub
from dpo_trainer.specfile import looks_like_path
from dpo_trainer.training import LOG_HISTORY, stage_metrics

CARD = "README.md"
PLOT = "training_curves.png"
PLOTTED = ("rewards/margins", "rewards/accuracies")


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
    """Train and eval side by side, rewards/* and loss first; throughput counters are left to summary.json."""
    names = {k.removeprefix("eval_") for k in metrics} - {"runtime", "samples_per_second", "steps_per_second"}
    order = sorted(names, key=lambda k: (not k.startswith("rewards/"), k != "loss", k))

    def cell(key: str) -> str:
        value = metrics.get(key)
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = ["| metric | train | eval |", "|---|---|---|"]
    rows += [f"| {k} | {cell(k)} | {cell('eval_' + k)} |" for k in order]
    return "\n".join(rows)


def render_card(ctx: RunContext, dpo_metrics: dict[str, float], sft_metrics: dict[str, float]) -> str:
    """The README text; the spec is included verbatim (it holds no secrets: tokens come from a Secret), less the
    sections that do not shape the model, so editing those never calls for a new card and push."""
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
    chain = "QLoRA SFT → merge → DPO (LoRA, reference = adapter disabled) → merge"
    if not spec.sft.enabled:
        chain = "DPO (LoRA, reference = adapter disabled) → merge"
    sections = [
        f"---\n{yaml.safe_dump(front, sort_keys=False).strip()}\n---",
        f"# {name}",
        f"`{model_name}` aligned with Direct Preference Optimization by dpo-operator: {chain}.",
        "## DPO results (final)",
        metrics_table(dpo_metrics) if dpo_metrics else "No metrics were logged.",
        f"![Reward margins and accuracies over training steps]({PLOT})",
    ]
    if sft_metrics:
        sections += ["## SFT results (final)", metrics_table(sft_metrics)]
    spec_yaml = yaml.safe_dump(model_identity(given), sort_keys=False)
    sections += [
        "## Training spec",
        f"Left out, as they do not shape the model: {', '.join(NOT_ABOUT_THE_MODEL)}.",
        f"```yaml\n{spec_yaml}```",
    ]
    return scrub("\n\n".join(sections) + "\n", ctx.secrets)


def run(ctx: RunContext) -> None:
    out = ctx.stage_dir("model_card")
    history = ctx.read_json("dpo", LOG_HISTORY) or []
    plot_training_curves(history, str(out / PLOT))
    sft_metrics = stage_metrics(ctx, "sft") if ctx.spec.sft.enabled else {}
    (out / CARD).write_text(render_card(ctx, stage_metrics(ctx, "dpo"), sft_metrics), encoding="utf-8")
    targets = [ctx.out_dir / "model"] + ([ctx.spec.output.directory] if ctx.spec.output.directory else [])
    for target in targets:
        for name in (CARD, PLOT):
            shutil.copy2(out / name, f"{target}/{name}")
