"""Template rendering, hold-out and prompt-length filtering of the data stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset

from dpo_operator.spec import DatasetSource
from dpo_trainer.data import Template, drop_long_prompts, hold_out, limit, load_source, render
from dpo_trainer.errors import DatasetError
from dpo_trainer.models import load_tokenizer
from dpo_trainer.specfile import load_job

from .conftest import QUICKSTART, TINY_DATA, TINY_MODEL

SEED_TEMPLATES = [
    Template("prompt", "promptTemplate", "Question: {question}\n\nAnswer: "),
    Template("chosen", "chosenTemplate", "{response_j}"),
    Template("rejected", "rejectedTemplate", "{response_k}"),
]
ROWS = Dataset.from_list(
    [{"qid": i, "question": f"q{i}?", "response_j": f"good {i}", "response_k": f"bad {i}"} for i in range(10)]
)


def test_render_maps_columns_like_the_seed() -> None:
    pairs = render(ROWS, SEED_TEMPLATES, "data.dpo")
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert pairs[3] == {"prompt": "Question: q3?\n\nAnswer: ", "chosen": "good 3", "rejected": "bad 3"}
    text = render(ROWS, [Template("text", "textTemplate", "#{qid}: {question} {{literal}}")], "data.sft")
    assert text[0] == {"text": "#0: q0? {literal}"}


def test_missing_column_names_the_field_the_column_and_what_exists() -> None:
    with pytest.raises(DatasetError) as error:
        render(ROWS, [*SEED_TEMPLATES[:2], Template("rejected", "rejectedTemplate", "{answer}")], "data.dpo")
    assert error.value.message == (
        "data.dpo.rejectedTemplate refers to column 'answer', which the dataset does not have "
        "(columns: qid, question, response_j, response_k)"
    )


def test_hold_out_takes_the_first_rows() -> None:
    train, evaluation = hold_out(ROWS, 3, "data.sft")
    assert evaluation["qid"] == [0, 1, 2] and train["qid"] == list(range(3, 10))
    assert hold_out(ROWS, 0, "data.sft") == (ROWS, None)
    with pytest.raises(DatasetError, match=r"data.dpo.evalSize \(10\) leaves no training rows"):
        hold_out(ROWS, 10, "data.dpo")
    assert len(limit(ROWS, 4)) == 4 and limit(ROWS, None) is ROWS


def test_long_prompts_are_dropped_by_token_count() -> None:
    tokenizer = load_tokenizer(load_job(QUICKSTART).spec, str(TINY_MODEL), None, None)
    pairs = Dataset.from_list([{"prompt": "short", "chosen": "a", "rejected": "b"}, {"prompt": "word " * 50}])
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pairs["prompt"]]
    kept = drop_long_prompts(pairs, tokenizer, max_prompt_length=lengths[0])
    assert kept["prompt"] == ["short"]


def test_load_local_files_and_report_missing_ones(tmp_path: Path) -> None:
    source = DatasetSource.model_validate({"files": {"paths": [str(TINY_DATA)]}})
    assert len(load_source(source, "data.dpo.source", None)) == 320
    missing = DatasetSource.model_validate({"files": {"paths": [str(tmp_path / "*.jsonl")]}})
    with pytest.raises(DatasetError, match=r"data.dpo.source.files: .* no file matches"):
        load_source(missing, "data.dpo.source", None)
    (tmp_path / "empty.jsonl").write_text("")
    empty = DatasetSource.model_validate({"files": {"paths": [str(tmp_path / "empty.jsonl")]}})
    with pytest.raises(DatasetError):
        load_source(empty, "data.dpo.source", None)
