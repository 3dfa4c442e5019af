"""The `data` and `dpo_data` stages: read only the rows the training stages consume, render the spec's templates,
enforce maxPromptLength, pick the eval rows, shuffle the SFT rows. `data` prepares SFT's rows and checks the DPO
sources' columns on their first rows (a bad column fails before any training); `dpo_data`, just before DPO,
prepares its pairs, so a change of DPO steps, batch shape or GPU count does not invalidate SFT.

How many rows (`Need`): a stage with maxSteps consumes maxSteps x batchSize x gradientAccumulationSteps x world
size examples: DPO pairs, SFT rows or, with sft.packing, packed maxLength sequences, counted in tokens as the
rows are rendered. data.maxSamples caps the rows further. Sources are read lazily (dpo_trainer.sources): first
the eval rows (the first evalSize rows, the seed's convention), then training rows until the need is met; DPO
pairs whose prompt is too long are dropped as they come, so reading goes on until enough survive. Only a stage
that trains by epochs (maxSteps -1) without maxSamples needs its whole split: that is loaded, rendered and
filtered with `datasets` in as many processes as runtime.cpu requests, and the log says so.

SFT training rows are shuffled with a 5,000-row buffer and spec.seed before TRL packs them, as the seed shuffled
its streamed dataset (adjacent rows of stack-exchange-paired share a question).

The rendered splits are saved with `save_to_disk` (RunLayout.split) so later stages (and resumed runs) never touch
the source again:

    sft_train, sft_eval   column "text"                       (when SFT is enabled)
    dpo_train, dpo_eval   columns "prompt", "chosen", "rejected"

RunLayout.data_stats(stage) holds their row counts, the DPO training pairs dropped as too long, and under "sources"
how much of each source was read: {"rowsRead", "filesRead", "files", "wholeSplit": false}, or
{"rowsRead", "wholeSplit": true, "processes"} where the whole split was processed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from dpo_trainer.context import RunContext, world_size
from dpo_trainer.errors import DatasetError
from dpo_trainer.layout import SplitPart, TrainingStage
from dpo_trainer.sources import Row, RowStream, describe, load_source, num_proc
from dpojob_api.spec import DatasetSource, DPOData, DPOJobSpec, TrainingSpec, template_fields
from dpojob_api.vocabulary import Stage

if TYPE_CHECKING:
    from datasets import Dataset

T = TypeVar("T")
Rendered = list[dict[str, str]]

SHUFFLE_BUFFER = 5000
"""Rows in the SFT shuffle buffer: the seed's `shuffle(buffer_size=5000)`."""
CHUNK = 64
"""Rows rendered (and tokenized) at a time while reading towards a need: at most this many are measured and not
kept."""


class Need(NamedTuple):
    """When a training split has enough: `rows` rows, or rows holding `tokens` tokens, whichever comes first.
    Neither bound: the whole split."""

    rows: int | None
    tokens: int | None = None

    @property
    def whole_split(self) -> bool:
        return self.rows is None and self.tokens is None

    def met(self, rows: int, tokens: int) -> bool:
        return (self.rows is not None and rows >= self.rows) or (self.tokens is not None and tokens >= self.tokens)

    def next_chunk(self, rows: int) -> int:
        """Rows to render next: never past the row bound."""
        return CHUNK if self.rows is None else max(0, min(CHUNK, self.rows - rows))


def examples_needed(training: TrainingSpec) -> int | None:
    """Examples a stage trains on: maxSteps optimizer steps of batchSize x accumulation x world size (None: epochs)."""
    if training.max_steps == -1:
        return None
    return training.max_steps * training.batch_size * training.gradient_accumulation_steps * world_size()


def _capped(rows: int | None, cap: int | None) -> int | None:
    return cap if rows is None else rows if cap is None else min(rows, cap)


def sft_need(spec: DPOJobSpec) -> Need:
    """SFT rows: with packing, enough tokens for the packed maxLength sequences the steps consume."""
    examples = examples_needed(spec.sft)
    if spec.sft.packing and examples is not None:
        return Need(spec.data.max_samples, examples * spec.sft.max_length)
    return Need(_capped(examples, spec.data.max_samples))


def dpo_need(spec: DPOJobSpec) -> Need:
    """DPO pairs that survive the prompt-length filter."""
    return Need(_capped(examples_needed(spec.dpo), spec.data.max_samples))


def sft_inputs(spec: DPOJobSpec) -> list[Any]:
    """What decides the SFT rows beyond spec.data: the need (steps, batch shape, world size) and the shuffle seed."""
    return [sft_need(spec) if spec.sft.enabled else None, spec.seed]


def dpo_inputs(spec: DPOJobSpec) -> list[Any]:
    """What decides the DPO pairs beyond spec.data (and the tokenizer): the need and the prompt-length filter."""
    return [dpo_need(spec), spec.dpo.max_prompt_length]


class Template(NamedTuple):
    """One output column rendered from a spec field's str.format template."""

    column: str
    field: str
    text: str


def dpo_templates(dpo: DPOData) -> list[Template]:
    return [
        Template("prompt", "promptTemplate", dpo.prompt_template),
        Template("chosen", "chosenTemplate", dpo.chosen_template),
        Template("rejected", "rejectedTemplate", dpo.rejected_template),
    ]


def check_columns(columns: list[str], templates: list[Template], field_path: str) -> None:
    """Fail with the missing column and the columns that exist, before any row is rendered."""
    for template in templates:
        for name in template_fields(template.text):
            if name not in columns:
                raise DatasetError(
                    f"{field_path}.{template.field} refers to column {name!r}, which the dataset does not have "
                    f"(columns: {', '.join(columns)})"
                )


def render_row(row: Row, templates: list[Template]) -> dict[str, str]:
    return {t.column: t.text.format(**row) for t in templates}


def _unrenderable(exc: Exception, field_path: str) -> DatasetError:
    return DatasetError(f"{field_path}: a template cannot be rendered: {exc}")


def render_rows(rows: Iterable[Row], templates: list[Template], field_path: str) -> Rendered:
    """Rows read so far through the templates."""
    try:
        return [render_row(row, templates) for row in rows]
    except (KeyError, IndexError, ValueError) as exc:
        raise _unrenderable(exc, field_path) from exc


def render(dataset: Dataset, templates: list[Template], field_path: str, processes: int = 1) -> Dataset:
    """A whole split through the templates (in `processes` processes); the source columns are dropped."""
    check_columns(list(dataset.column_names), templates, field_path)
    try:
        return dataset.map(
            partial(render_row, templates=templates),
            remove_columns=dataset.column_names,
            num_proc=processes if processes > 1 else None,
            desc=f"Rendering {field_path}",
        )
    except (KeyError, IndexError, ValueError) as exc:
        raise _unrenderable(exc, field_path) from exc


def check_hold_out(eval_size: int, rows: int, field_path: str) -> None:
    """The eval rows must leave some to train on."""
    if eval_size and eval_size >= rows:
        raise DatasetError(f"{field_path}.evalSize ({eval_size}) leaves no training rows: the dataset has {rows}")


def hold_out(dataset: Dataset, eval_size: int, field_path: str) -> tuple[Dataset, Dataset | None]:
    """The first eval_size rows become the eval split (the seed's convention)."""
    if eval_size == 0:
        return dataset, None
    check_hold_out(eval_size, len(dataset), field_path)
    return dataset.select(range(eval_size, len(dataset))), dataset.select(range(eval_size))


def prompt_lengths(tokenizer: Any, prompts: list[str]) -> list[int]:
    """Prompt tokens as DPOTrainer counts them, with the tokenizer's special tokens (Llama's BOS). TRL may train on
    fewer (when the prompt's last token merges into the answer), never on more."""
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]]


def sequence_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """Tokens each SFT text adds to the packed stream: SFTTrainer tokenizes it with special tokens and appends EOS."""
    return [len(ids) + 1 for ids in tokenizer(texts)["input_ids"]]


def drop_long_prompts(dataset: Dataset, tokenizer: Any, max_prompt_length: int, processes: int = 1) -> Dataset:
    """TRL 1.x no longer enforces max_prompt_length, so pairs with longer prompts are dropped here."""

    def keep(batch: dict[str, list[str]]) -> list[bool]:
        return [n <= max_prompt_length for n in prompt_lengths(tokenizer, batch["prompt"])]

    return dataset.filter(
        keep,
        batched=True,
        num_proc=processes if processes > 1 else None,
        desc=f"Dropping prompts over {max_prompt_length} tokens",
    )


def buffer_shuffle(items: Iterable[T], buffer_size: int, seed: int) -> Iterator[T]:
    """The seed's streaming shuffle (datasets' IterableDataset.shuffle), seeded: each new item takes a random slot
    of a full buffer, whose occupant comes out; what is left leaves in random order. Reads at most buffer_size items
    ahead of those it yields, so a large source is not read further than its shuffled prefix needs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    buffer: list[T] = []
    slots: Iterator[int] = iter(())
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        slot = next(slots, None)
        if slot is None:
            slots = iter(rng.integers(0, buffer_size, size=1000).tolist())
            slot = next(slots)
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


def say(message: str) -> None:
    """One line on stderr (the pod's log)."""
    print(f"dpo-trainer: {message}", file=sys.stderr, flush=True)


class Reader:
    """Opens the run's sources, lazily or whole, and keeps what it read of each for stats.json (and the log)."""

    def __init__(self, ctx: RunContext) -> None:
        self.token = ctx.token
        self.cpu = ctx.spec.runtime.cpu
        self.processes = 1
        self.sources: dict[str, dict[str, Any]] = {}

    def open(self, source: DatasetSource, source_path: str, templates: list[Template], stage_path: str) -> RowStream:
        """A lazy stream, its columns checked against the templates on its first rows."""
        stream = RowStream(source, source_path, self.token)
        check_columns(stream.columns, templates, stage_path)
        return stream

    def streamed(self, stream: RowStream, purpose: str) -> None:
        """Record and say how far a lazy read went."""
        self.sources[stream.field_path] = {
            "rowsRead": stream.rows_read,
            "filesRead": stream.files_read,
            "files": len(stream.files),
            "wholeSplit": False,
        }
        everything = " (all of it)" if stream.exhausted else ""
        say(
            f"{stream.where}: read {stream.rows_read:,} rows{everything} from {stream.files_read} of "
            f"{len(stream.files)} files for {purpose}"
        )

    def whole(
        self, source: DatasetSource, source_path: str, templates: list[Template], stage_path: str, why: str
    ) -> Dataset:
        """A whole split, loaded and rendered in num_proc(runtime.cpu) processes; the log says why."""
        self.processes = num_proc(self.cpu)
        where = describe(source, source_path)
        say(f"{where}: {why}: processing the whole split in {self.processes} processes (runtime.cpu {self.cpu})")
        rows = load_source(source, source_path, self.token, self.processes)
        self.sources[source_path] = {"rowsRead": len(rows), "wholeSplit": True, "processes": self.processes}
        say(f"{where}: read {len(rows):,} rows (all of it)")
        return render(rows, templates, stage_path, self.processes)


EPOCHS = "maxSteps is -1 (training by epochs)"


def take_texts(rows: Iterator[Row], templates: list[Template], need: Need, tokenizer: Any) -> Rendered:
    """Rendered SFT rows until the need is met, counting tokens only when the need is in tokens."""
    texts: Rendered = []
    tokens = 0
    while not need.met(len(texts), tokens):
        chunk = render_rows(islice(rows, need.next_chunk(len(texts))), templates, "data.sft")
        if not chunk:
            break
        lengths = sequence_lengths(tokenizer, [r["text"] for r in chunk]) if need.tokens else [0] * len(chunk)
        for row, length in zip(chunk, lengths, strict=True):
            if need.met(len(texts), tokens):
                break
            texts.append(row)
            tokens += length
    return texts


def take_pairs(
    rows: Iterator[Row], templates: list[Template], pairs: int, tokenizer: Any, max_prompt_length: int
) -> tuple[Rendered, int]:
    """Rendered DPO pairs until `pairs` have a prompt of at most max_prompt_length tokens; (kept, dropped)."""
    kept: Rendered = []
    dropped = 0
    while len(kept) < pairs:
        chunk = render_rows(islice(rows, min(CHUNK, pairs - len(kept))), templates, "data.dpo")
        if not chunk:
            break
        for pair, length in zip(chunk, prompt_lengths(tokenizer, [p["prompt"] for p in chunk]), strict=True):
            if length <= max_prompt_length:
                kept.append(pair)
            else:
                dropped += 1
    return kept, dropped


def as_dataset(rows: Rendered) -> Dataset | None:
    from datasets import Dataset

    return Dataset.from_list(rows) if rows else None


def sft_splits(reader: Reader, spec: DPOJobSpec, tokenizer: Any) -> tuple[Dataset | None, Dataset | None]:
    """(train, eval) of SFT: the first evalSize rows held out, the rest shuffled and read until the need is met."""
    sft = spec.data.sft
    assert sft is not None
    templates = [Template("text", "textTemplate", sft.text_template)]
    need = sft_need(spec)
    if need.whole_split:
        rows = reader.whole(sft.source, "data.sft.source", templates, "data.sft", f"sft.{EPOCHS}")
        train, evaluation = hold_out(rows, sft.eval_size, "data.sft")
        return train.select(list(buffer_shuffle(range(len(train)), SHUFFLE_BUFFER, spec.seed))), evaluation
    stream = reader.open(sft.source, "data.sft.source", templates, "data.sft")
    rows = iter(stream)
    held_out = render_rows(islice(rows, sft.eval_size), templates, "data.sft")
    texts = take_texts(buffer_shuffle(rows, SHUFFLE_BUFFER, spec.seed), templates, need, tokenizer)
    if not texts:
        check_hold_out(sft.eval_size, stream.rows_read, "data.sft")
    purpose = f"{need.tokens:,} tokens of SFT text" if need.tokens else f"{need.rows:,} SFT rows"
    reader.streamed(stream, f"{purpose} and {sft.eval_size:,} eval rows")
    return as_dataset(texts), as_dataset(held_out)


def dpo_eval_source(reader: Reader, dpo: DPOData, templates: list[Template]) -> Dataset:
    """The first evalSize rows of evalSource, or all of it when evalSize is 0."""
    assert dpo.eval_source is not None
    if dpo.eval_size == 0:
        return reader.whole(dpo.eval_source, "data.dpo.evalSource", templates, "data.dpo", "evalSize is 0")
    stream = reader.open(dpo.eval_source, "data.dpo.evalSource", templates, "data.dpo")
    rows = render_rows(islice(stream, dpo.eval_size), templates, "data.dpo")
    reader.streamed(stream, f"{dpo.eval_size:,} eval rows")
    return as_dataset(rows)


def dpo_splits(reader: Reader, spec: DPOJobSpec, tokenizer: Any) -> tuple[Dataset, Dataset | None, int]:
    """(train, eval, pairs dropped for too long a prompt) of DPO: reads until enough pairs survive the filter."""
    dpo = spec.data.dpo
    assert dpo is not None
    templates = dpo_templates(dpo)
    need = dpo_need(spec)
    max_prompt_length = spec.dpo.max_prompt_length
    held_out = dpo.eval_size if dpo.eval_source is None else 0
    if need.whole_split:
        pairs = reader.whole(dpo.source, "data.dpo.source", templates, "data.dpo", f"dpo.{EPOCHS}")
        pairs, evaluation = hold_out(pairs, held_out, "data.dpo")
        train = drop_long_prompts(pairs, tokenizer, max_prompt_length, reader.processes)
        dropped = len(pairs) - len(train)
    else:
        assert need.rows is not None
        stream = reader.open(dpo.source, "data.dpo.source", templates, "data.dpo")
        rows = iter(stream)
        evaluation = as_dataset(render_rows(islice(rows, held_out), templates, "data.dpo"))
        kept, dropped = take_pairs(rows, templates, need.rows, tokenizer, max_prompt_length)
        if not kept and not dropped:
            check_hold_out(held_out, stream.rows_read, "data.dpo")
        reader.streamed(stream, f"{need.rows:,} DPO pairs and {held_out:,} eval rows")
        train = as_dataset(kept)
    if train is None or len(train) == 0:
        raise DatasetError(
            f"no DPO pairs left after dropping prompts longer than dpo.maxPromptLength "
            f"({max_prompt_length} tokens): raise it or shorten promptTemplate"
        )
    if dpo.eval_source is not None:
        evaluation = dpo_eval_source(reader, dpo, templates)
    if evaluation is not None:
        evaluation = drop_long_prompts(evaluation, tokenizer, max_prompt_length, reader.processes)
    return train, evaluation, dropped


def check_dpo_columns(reader: Reader, spec: DPOJobSpec) -> None:
    """Open the DPO sources on their first rows only: a missing column fails before any training, not after SFT."""
    dpo = spec.data.dpo
    assert dpo is not None
    templates = dpo_templates(dpo)
    reader.open(dpo.source, "data.dpo.source", templates, "data.dpo")
    if dpo.eval_source is not None:
        reader.open(dpo.eval_source, "data.dpo.evalSource", templates, "data.dpo")


def save(ctx: RunContext, stage: TrainingStage, splits: dict[SplitPart, Dataset | None], stats: dict[str, Any]) -> None:
    """Save a training stage's splits and its data stage's stats.json (row counts, then `stats`)."""
    counts: dict[str, Any] = {}
    for part, dataset in splits.items():
        if dataset is not None and len(dataset) > 0:
            path = ctx.layout.split(stage, part)
            dataset.save_to_disk(str(path))
            counts[path.name] = len(dataset)
    ctx.write_json(ctx.layout.data_stats(stage), counts | stats)


def run_sft_data(ctx: RunContext) -> None:
    """The `data` stage: the SFT rows (when SFT is enabled), and the DPO sources' columns checked."""
    from dpo_trainer.models import load_tokenizer

    spec, reader = ctx.spec, Reader(ctx)
    splits: dict[SplitPart, Dataset | None] = {}
    if spec.sft.enabled:
        tokenizer = load_tokenizer(spec, spec.model.name, spec.model.revision, ctx.token)
        splits["train"], splits["eval"] = sft_splits(reader, spec, tokenizer)
    check_dpo_columns(reader, spec)
    save(ctx, Stage.SFT, splits, {"sources": reader.sources})


def run_dpo_data(ctx: RunContext) -> None:
    """The `dpo_data` stage: the DPO pairs. A stage of its own so that a DPO-only change (steps, batch, GPUs) reads
    pairs again without invalidating SFT."""
    from dpo_trainer.models import load_tokenizer

    spec, reader = ctx.spec, Reader(ctx)
    tokenizer = load_tokenizer(spec, spec.model.name, spec.model.revision, ctx.token)
    train, evaluation, dropped = dpo_splits(reader, spec, tokenizer)
    stats = {"dpo_train_dropped_long_prompts": dropped, "sources": reader.sources}
    save(ctx, Stage.DPO, {"train": train, "eval": evaluation}, stats)


def stats(ctx: RunContext) -> dict[str, Any]:
    """Both data stages' stats.json as one (summary.json "data")."""
    parts = [ctx.read_json(ctx.layout.data_stats(stage)) or {} for stage in (Stage.SFT, Stage.DPO)]
    sources = {k: v for part in parts for k, v in part.pop("sources", {}).items()}
    return {k: v for part in parts for k, v in part.items()} | ({"sources": sources} if sources else {})


def load_split(ctx: RunContext, stage: TrainingStage, part: SplitPart) -> Dataset | None:
    """A split saved by the data stage, or None when the stage produced none."""
    from datasets import load_from_disk

    path = ctx.layout.split(stage, part)
    return load_from_disk(str(path)) if path.exists() else None
