"""The `data` stage: load rows, render the spec's templates, enforce maxPromptLength, pick the eval rows.

The rendered splits are saved with `save_to_disk` (RunLayout.split) so later stages (and resumed runs)
never touch the source again:

    sft_train, sft_eval   column "text"                       (when SFT is enabled)
    dpo_train, dpo_eval   columns "prompt", "chosen", "rejected"

and their row counts, including prompts dropped as too long, go to RunLayout.data_stats.
"""

from __future__ import annotations

import glob
from typing import TYPE_CHECKING, Any, NamedTuple

from dpo_trainer.context import RunContext
from dpo_trainer.errors import DatasetError, reraise
from dpo_trainer.layout import SplitPart, TrainingStage
from dpojob_api.spec import DatasetSource, template_fields

if TYPE_CHECKING:
    from datasets import Dataset


def load_source(source: DatasetSource, field_path: str, token: str | None) -> Dataset:
    """Load one split from the Hub or from local files; every failure names the spec field."""
    from datasets import load_dataset

    try:
        if source.hub is not None:
            hub = source.hub
            where = f"{field_path}.hub: dataset {hub.name!r}"
            dataset = load_dataset(
                hub.name,
                name=hub.config,
                split=hub.split,
                data_dir=hub.data_dir,
                revision=hub.revision,
                token=token,
            )
        else:
            assert source.files is not None
            files = sorted({f for pattern in source.files.paths for f in glob.glob(pattern)})
            where = f"{field_path}.files: {', '.join(source.files.paths)}"
            if not files:
                raise DatasetError(f"{where}: no file matches")
            builder = "parquet" if source.files.format == "parquet" else "json"
            dataset = load_dataset(builder, data_files=files, split="train")
    except Exception as exc:
        reraise(exc, DatasetError, f"loading {where}")
    if len(dataset) == 0:
        raise DatasetError(f"{where} has no rows")
    return dataset


class Template(NamedTuple):
    """One output column rendered from a spec field's str.format template."""

    column: str
    field: str
    text: str


def check_columns(dataset: Dataset, templates: list[Template], field_path: str) -> None:
    """Fail with the missing column and the columns that exist, before any row is rendered."""
    columns = list(dataset.column_names)
    for template in templates:
        for name in template_fields(template.text):
            if name not in columns:
                raise DatasetError(
                    f"{field_path}.{template.field} refers to column {name!r}, which the dataset does not have "
                    f"(columns: {', '.join(columns)})"
                )


def render(dataset: Dataset, templates: list[Template], field_path: str) -> Dataset:
    """Map rows through the templates; the source columns are dropped."""
    check_columns(dataset, templates, field_path)

    def apply(row: dict[str, Any]) -> dict[str, str]:
        return {t.column: t.text.format(**row) for t in templates}

    try:
        return dataset.map(apply, remove_columns=dataset.column_names, desc=f"Rendering {field_path}")
    except (KeyError, IndexError, ValueError) as exc:
        raise DatasetError(f"{field_path}: a template cannot be rendered: {exc}") from exc


def hold_out(dataset: Dataset, eval_size: int, field_path: str) -> tuple[Dataset, Dataset | None]:
    """The first eval_size rows become the eval split (the seed's convention)."""
    if eval_size == 0:
        return dataset, None
    if eval_size >= len(dataset):
        raise DatasetError(
            f"{field_path}.evalSize ({eval_size}) leaves no training rows: the dataset has {len(dataset)}"
        )
    return dataset.select(range(eval_size, len(dataset))), dataset.select(range(eval_size))


def drop_long_prompts(dataset: Dataset, tokenizer: Any, max_prompt_length: int) -> Dataset:
    """TRL 1.x no longer enforces max_prompt_length, so pairs with longer prompts are dropped here.

    Prompts are counted as DPOTrainer tokenizes them, with the tokenizer's special tokens (Llama's BOS). TRL may
    train on fewer (when the prompt's last token merges into the answer), never on more.
    """

    def keep(batch: dict[str, list[str]]) -> list[bool]:
        ids = tokenizer(batch["prompt"])["input_ids"]
        return [len(x) <= max_prompt_length for x in ids]

    return dataset.filter(keep, batched=True, desc=f"Dropping prompts over {max_prompt_length} tokens")


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first max_samples rows (all when None)."""
    return dataset if max_samples is None else dataset.select(range(min(max_samples, len(dataset))))


def run(ctx: RunContext) -> None:
    """Render and save every split the later stages read."""
    from dpo_trainer.models import load_tokenizer

    spec = ctx.spec
    splits: dict[tuple[TrainingStage, SplitPart], Dataset | None] = {}
    stats: dict[str, int] = {}
    if spec.sft.enabled:
        assert spec.data.sft is not None
        sft = spec.data.sft
        rows = render(
            load_source(sft.source, "data.sft.source", ctx.token),
            [Template("text", "textTemplate", sft.text_template)],
            "data.sft",
        )
        train, evaluation = hold_out(rows, sft.eval_size, "data.sft")
        splits["sft", "train"], splits["sft", "eval"] = limit(train, spec.data.max_samples), evaluation

    dpo = spec.data.dpo
    assert dpo is not None
    templates = [
        Template("prompt", "promptTemplate", dpo.prompt_template),
        Template("chosen", "chosenTemplate", dpo.chosen_template),
        Template("rejected", "rejectedTemplate", dpo.rejected_template),
    ]
    pairs = render(load_source(dpo.source, "data.dpo.source", ctx.token), templates, "data.dpo")
    if dpo.eval_source is not None:
        train = pairs
        evaluation = render(load_source(dpo.eval_source, "data.dpo.evalSource", ctx.token), templates, "data.dpo")
        evaluation = limit(evaluation, dpo.eval_size or None)
    else:
        train, evaluation = hold_out(pairs, dpo.eval_size, "data.dpo")
    tokenizer = load_tokenizer(spec, spec.model.name, spec.model.revision, ctx.token)
    kept = drop_long_prompts(train, tokenizer, spec.dpo.max_prompt_length)
    stats["dpo_train_dropped_long_prompts"] = len(train) - len(kept)
    train = limit(kept, spec.data.max_samples)
    if len(train) == 0:
        raise DatasetError(
            f"no DPO pairs left after dropping prompts longer than dpo.maxPromptLength "
            f"({spec.dpo.max_prompt_length} tokens): raise it or shorten promptTemplate"
        )
    splits["dpo", "train"] = train
    splits["dpo", "eval"] = (
        drop_long_prompts(evaluation, tokenizer, spec.dpo.max_prompt_length) if evaluation is not None else None
    )
    for (stage, part), dataset in splits.items():
        if dataset is not None and len(dataset) > 0:
            path = ctx.layout.split(stage, part)
            dataset.save_to_disk(str(path))
            stats[path.name] = len(dataset)
    ctx.write_json(ctx.layout.data_stats, stats)


def load_split(ctx: RunContext, stage: TrainingStage, part: SplitPart) -> Dataset | None:
    """A split saved by the data stage, or None when the stage produced none."""
    from datasets import load_from_disk

    path = ctx.layout.split(stage, part)
    return load_from_disk(str(path)) if path.exists() else None
