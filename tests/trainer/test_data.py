"""The data stage: template rendering, hold-out, prompt-length filtering, rows read only as far as the training steps
need them (lazily, file by file, from local files or the Hub), the seeded SFT shuffle, whole splits in parallel
for epochs, and data prepared by rank 0 only."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import Dataset, load_from_disk
from huggingface_hub import HfApi

from dpo_dev.hub import LocalHub
from dpo_trainer import data, pipeline
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.data import SHUFFLE_BUFFER, Template, buffer_shuffle, drop_long_prompts, hold_out, render
from dpo_trainer.errors import DatasetError
from dpo_trainer.layout import CARD_FILE, RunLayout, SplitPart, TrainingStage
from dpo_trainer.models import load_tokenizer
from dpo_trainer.progress import Reporter
from dpo_trainer.sources import RowStream, load_source, num_proc
from dpo_trainer.specfile import load_job, resolve_local_paths
from dpojob_api.spec import DatasetSource, DPOJob, DPOJobSpec

from .conftest import (
    HUB_TOKEN,
    HUB_USER,
    QUICKSTART,
    TINY_DATA,
    TINY_MODEL,
    assert_failed,
    hub_env,
    quickstart_job,
    run_cli,
)

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


def test_long_prompts_are_dropped_by_token_count_as_trl_tokenizes_them() -> None:
    """Llama-style tokenizers prepend BOS, and TRL's prompt_ids include it: a prompt one token over is dropped."""
    from tokenizers.processors import TemplateProcessing
    from trl.data_utils import _tokenize  # what DPOTrainer's dataset preparation calls for a text prompt

    tokenizer = load_tokenizer(load_job(QUICKSTART).spec, str(TINY_MODEL), None, None)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    prompts = ["short", "Question: How do I copy an array in JavaScript?\n\nAnswer: ", "word " * 50]
    pairs = Dataset.from_list([{"prompt": p, "chosen": "a", "rejected": "b"} for p in prompts])
    trl_lengths = [len(_tokenize(tokenizer, p)["input_ids"]) for p in prompts]
    assert trl_lengths[1] == len(tokenizer(prompts[1], add_special_tokens=False)["input_ids"]) + 1
    kept = drop_long_prompts(pairs, tokenizer, max_prompt_length=trl_lengths[1])
    assert kept["prompt"] == prompts[:2]
    kept = drop_long_prompts(pairs, tokenizer, max_prompt_length=trl_lengths[1] - 1)
    assert kept["prompt"] == prompts[:1]


def _data_stage(spec: DPOJobSpec, out_dir: Path) -> dict[str, Any]:
    """Run both data stages alone; their stats (row counts, sources)."""
    layout = RunLayout(out_dir)
    ctx = RunContext(spec, layout, Reporter(io.StringIO()), None, RunState(layout.state))
    data.run_sft_data(ctx)
    data.run_dpo_data(ctx)
    return data.stats(ctx)


def test_eval_size_caps_a_separate_eval_source(tmp_path: Path) -> None:
    """The seed evaluated on the first 1000 rows of data/evaluation, not on all of it at every evaluation."""
    job = quickstart_job(sft={"enabled": False})
    job["spec"]["data"]["dpo"]["evalSource"] = {"files": {"paths": [str(TINY_DATA)]}}
    job["spec"]["data"]["dpo"]["evalSize"] = 10
    spec = resolve_local_paths(DPOJob.model_validate(job).spec)
    stats = _data_stage(spec, tmp_path / "capped")
    assert {k: v for k, v in stats.items() if k != "sources"} == {
        "dpo_train": 160,  # the quickstart's 40 DPO steps x 4 pairs
        "dpo_eval": 10,
        "dpo_train_dropped_long_prompts": 0,
    }
    assert stats["sources"]["data.dpo.evalSource"] == {"rowsRead": 10, "filesRead": 1, "files": 1, "wholeSplit": False}
    first_rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:10]]
    evaluation = load_from_disk(str(RunLayout(tmp_path / "capped").split("dpo", "eval")))
    assert evaluation["chosen"] == [row["response_j"] for row in first_rows]
    spec.data.dpo.eval_size = 0
    stats = _data_stage(spec, tmp_path / "all")
    assert stats["dpo_eval"] == 320 and stats["sources"]["data.dpo.evalSource"]["wholeSplit"] is True


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
    with pytest.raises(DatasetError, match=r"data.dpo.source.files: .*empty.jsonl has no rows"):
        list(RowStream(empty, "data.dpo.source", None))


def test_preset_dataset_from_the_hub_without_sft(hub: LocalHub, stack_exchange_on_hub: str, tmp_path: Path) -> None:
    """data.preset stack-exchange-paired read from the (local) Hub with a token; sft.enabled=false starts DPO from
    the base; a combined loss (RPO-style sigmoid + sft) with precomputed reference log-probs."""
    job = quickstart_job(
        quantization={"mode": "none"},
        sft={"enabled": False},
        dpo={
            "maxSteps": 4,
            "loggingSteps": 2,
            "evalSteps": 4,
            "lossType": ["sigmoid", "sft"],
            "lossWeights": [1.0, 0.5],
            "precomputeRefLogProbs": True,
        },
        output={"directory": str(tmp_path / "final-model")},
    )
    job["spec"]["data"] = {"preset": "stack-exchange-paired"}
    run = run_cli(job, tmp_path, "hubdata", env=hub_env(hub))
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(run.stage_ends()) == ["data", "dpo_data", "dpo", "dpo_merge", "model_card"]
    summary = run.summary()
    assert summary["data"] == {
        "dpo_train": 16,  # 4 steps x 4 pairs
        "dpo_eval": 40,
        "dpo_train_dropped_long_prompts": 0,
        "sources": {
            "data.dpo.source": {"rowsRead": 16, "filesRead": 1, "files": 1, "wholeSplit": False},
            "data.dpo.evalSource": {"rowsRead": 40, "filesRead": 1, "files": 1, "wholeSplit": False},
        },
    }
    assert summary["sftMetrics"] == {} and "eval_rewards/margins" in summary["metrics"]
    card = (tmp_path / "final-model" / CARD_FILE).read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["datasets"] == [stack_exchange_on_hub] and "sft" not in front["tags"]
    assert "## SFT results" not in card
    # Provenance: the dataset's exact commit, resolved once and recorded in the summary and the card.
    sha = HfApi(endpoint=hub.url, token=HUB_TOKEN).dataset_info(stack_exchange_on_hub).sha
    (dataset,) = summary["provenance"]["datasets"]
    assert dataset == {"name": stack_exchange_on_hub, "revision": "main", "sha": sha, "local": False}
    assert f"- dataset: `{stack_exchange_on_hub}` at `main`, commit `{sha}`" in card
    assert set(summary["efficiency"]) == {"dpo"} and summary["efficiency"]["dpo"]["stepsPerSecond"] > 0


@pytest.mark.usefixtures("stack_exchange_on_hub")
@pytest.mark.parametrize("token", ["wrong-token-123456", ""])
def test_hub_dataset_with_a_bad_token_is_an_auth_or_dataset_error(hub: LocalHub, tmp_path: Path, token: str) -> None:
    job = quickstart_job(output={"directory": str(tmp_path / "final-model")})
    job["spec"]["data"] = {"preset": "stack-exchange-paired"}
    run = run_cli(job, tmp_path, "baddata", env=hub_env(hub, token))
    expected = "HubAuthError" if token else "DatasetError"  # private repos look missing without a token
    assert run.returncode == (5 if token else 3), run.stderr[-3000:]
    assert run.termination["reason"] == expected
    assert run.stderr.splitlines()[-1].startswith(f"dpo-trainer: {expected}: ")


def _numbered_rows(path: Path, count: int) -> Path:
    """A JSON Lines file of `count` rows: the tiny set's rows over and over, qid numbering them in file order."""
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    with path.open("w") as out:
        for qid in range(count):
            out.write(json.dumps({**rows[qid % len(rows)], "qid": qid}) + "\n")
    return path


def _files_spec(path: Path, **overrides: Any) -> DPOJobSpec:
    """The quickstart reading both stages' rows from `path`; the SFT text starts with the row's qid."""
    job = quickstart_job(**overrides)
    for stage in ("sft", "dpo"):
        job["spec"]["data"][stage]["source"] = {"files": {"paths": [str(path)]}}
    job["spec"]["data"]["sft"]["textTemplate"] = "{qid}: Question: {question}\n\nAnswer: {response_j}"
    return resolve_local_paths(DPOJob.model_validate(job).spec)


def _saved(out_dir: Path, stage: TrainingStage, part: SplitPart, column: str) -> list[str]:
    return list(load_from_disk(str(RunLayout(out_dir).split(stage, part)))[column])


def _qids(texts: list[str]) -> list[int]:
    return [int(text.split(":", 1)[0]) for text in texts]


def test_only_the_rows_the_steps_need_are_read_rendered_and_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 rows on disk; on 2 processes 3 SFT steps of 4 rows need 24 rows, 5 DPO steps of 4 pairs need 40. SFT
    reads its shuffle buffer further; nothing else is read, and only what is saved is rendered."""
    source = _numbered_rows(tmp_path / "rows.jsonl", 20_000)
    spec = _files_spec(source, sft={"maxSteps": 3, "packing": False}, dpo={"maxSteps": 5})
    rendered: list[int] = []
    render_row = data.render_row

    def counted(row: dict[str, Any], templates: list[Template]) -> dict[str, str]:
        rendered.append(row["qid"])
        return render_row(row, templates)

    monkeypatch.setattr(data, "render_row", counted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    stats = _data_stage(spec, tmp_path / "out")
    assert {k: v for k, v in stats.items() if k != "sources"} == {
        "sft_train": 24,
        "sft_eval": 32,
        "dpo_train": 40,
        "dpo_eval": 32,
        "dpo_train_dropped_long_prompts": 0,
    }
    assert stats["sources"] == {
        "data.sft.source": {"rowsRead": 32 + 24 + SHUFFLE_BUFFER, "filesRead": 1, "files": 1, "wholeSplit": False},
        "data.dpo.source": {"rowsRead": 32 + 40, "filesRead": 1, "files": 1, "wholeSplit": False},
    }
    assert len(rendered) == 32 + 24 + 32 + 40
    assert _qids(_saved(tmp_path / "out", "sft", "eval", "text")) == list(range(32))


def test_packed_sft_reads_rows_until_the_packed_sequences_are_filled(tmp_path: Path) -> None:
    """3 steps x 4 sequences of 128 tokens: rows are read until their tokens (as SFTTrainer counts them, EOS included)
    fill 1,536, and not one row more."""
    spec = _files_spec(_numbered_rows(tmp_path / "rows.jsonl", 20_000), sft={"maxSteps": 3}, dpo={"maxSteps": 1})
    _data_stage(spec, tmp_path / "out")
    tokenizer = load_tokenizer(spec, spec.model.name, None, None)
    lengths = data.sequence_lengths(tokenizer, _saved(tmp_path / "out", "sft", "train", "text"))
    assert sum(lengths) >= 3 * 4 * 128 > sum(lengths[:-1])


def test_buffer_shuffle_is_seeded_and_reads_at_most_a_buffer_ahead() -> None:
    taken: list[int] = []

    def source() -> Iterator[int]:
        for item in range(10_000):
            taken.append(item)
            yield item

    first = list(islice(buffer_shuffle(source(), 100, seed=3), 50))
    assert len(taken) == 150 and len(set(first)) == 50 and max(first) < 150
    shuffled = list(buffer_shuffle(range(1000), 100, seed=3))
    assert sorted(shuffled) == list(range(1000)) and shuffled != list(range(1000))
    assert shuffled == list(buffer_shuffle(range(1000), 100, seed=3)) != list(buffer_shuffle(range(1000), 100, seed=4))


def test_sft_shuffle_is_reproducible_and_follows_the_seed(tmp_path: Path) -> None:
    """The seed shuffled its streamed SFT rows with a 5,000-row buffer; here with spec.seed, so a rerun packs the same
    rows in the same order. The eval rows stay the first evalSize rows, in order."""
    source = _numbered_rows(tmp_path / "rows.jsonl", 8_000)
    orders = {}
    for name, seed in (("a", 0), ("again", 0), ("other", 1)):
        spec = _files_spec(source, sft={"maxSteps": 50, "packing": False}, dpo={"maxSteps": 1}, seed=seed)
        _data_stage(spec, tmp_path / name)
        orders[name] = _qids(_saved(tmp_path / name, "sft", "train", "text"))
        assert _qids(_saved(tmp_path / name, "sft", "eval", "text")) == list(range(32))
    assert orders["a"] == orders["again"] != orders["other"]
    assert len(set(orders["a"])) == 200 and min(orders["a"]) >= 32 and max(orders["a"]) > 32 + 200
    assert orders["a"] != sorted(orders["a"])


@pytest.mark.parametrize(("rank", "prepares"), [("0", True), ("1", False)])
def test_rank_above_0_never_prepares_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rank: str, prepares: bool
) -> None:
    """Every rank runs the pipeline; the data stages (like the merges and the push) run on rank 0 alone, the others
    wait for it at the stage barrier and then train on what it saved."""
    ran: list[str] = []
    stages = tuple(dataclasses.replace(s, run=lambda ctx, name=s.name: ran.append(name)) for s in pipeline.STAGES)
    monkeypatch.setattr(pipeline, "STAGES", stages)
    monkeypatch.setattr("dpo_trainer.hub.check_token", lambda ctx: None)
    monkeypatch.setenv("RANK", rank)
    pipeline.run(load_job(QUICKSTART).spec, tmp_path, Reporter(io.StringIO()), None, {})
    assert set(ran) & {"data", "dpo_data"} == ({"data", "dpo_data"} if prepares else set())
    assert {"sft", "dpo"} <= set(ran)


def test_num_proc_follows_the_cpu_request_within_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert [num_proc(cpu) for cpu in ("500m", "1", "2.5", "2500m", "4", "64")] == [1, 1, 2, 2, 3, 3]


def test_epochs_process_the_whole_split_in_parallel_and_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """maxSteps -1 trains on every row: the whole split is loaded, rendered and filtered in runtime.cpu processes."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    job = quickstart_job(sft={"maxSteps": -1}, dpo={"maxSteps": -1}, runtime={"cpu": "2"})
    stats = _data_stage(resolve_local_paths(DPOJob.model_validate(job).spec), tmp_path / "out")
    assert stats["sft_train"] == stats["dpo_train"] == 288
    whole = {"rowsRead": 320, "wholeSplit": True, "processes": 2}
    assert stats["sources"] == {"data.sft.source": whole, "data.dpo.source": whole}
    log = capfd.readouterr().err
    assert "dpo.maxSteps is -1 (training by epochs): processing the whole split in 2 processes" in log
    texts = _saved(tmp_path / "out", "sft", "train", "text")
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[32:]]
    in_file_order = [f"Question: {row['question']}\n\nAnswer: {row['response_j']}" for row in rows]
    assert texts != in_file_order and sorted(texts) == sorted(in_file_order)  # shuffled too


SHARDED = f"{HUB_USER}/stack-exchange-sharded"


@pytest.fixture(scope="module")
def sharded_on_hub(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seed's layout as parquet shards of 400 rows (row groups of 100): data/rl has three."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import HfApi

    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("sharded")
    for data_dir, shards, first_qid in (("rl", 3, 0), ("evaluation", 1, 10_000)):
        (folder / "data" / data_dir).mkdir(parents=True)
        for shard in range(shards):
            qids = range(first_qid + shard * 400, first_qid + (shard + 1) * 400)
            table = pa.Table.from_pylist([{**rows[qid % len(rows)], "qid": qid} for qid in qids])
            path = folder / "data" / data_dir / f"train-{shard:05d}-of-{shards:05d}.parquet"
            pq.write_table(table, path, row_group_size=100)
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo(SHARDED, repo_type="dataset")
    api.upload_folder(repo_id=SHARDED, repo_type="dataset", folder_path=folder)
    return SHARDED


def _downloaded(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Data files the local Hub served (GET, not HEAD) to the client."""
    served = re.compile(rf'"GET /datasets/{SHARDED}/resolve/[^/ ]+/(data/\S+) HTTP')
    return sorted(m[1] for r in caplog.records if (m := served.search(r.getMessage())))


@pytest.mark.parametrize("chosen", ["{response_j}", "{answer}"])
def test_a_hub_dataset_is_downloaded_only_as_far_as_the_steps_need(
    hub: LocalHub, sharded_on_hub: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, chosen: str
) -> None:
    """12 DPO pairs and 8 eval rows need the first shard of data/rl and of data/evaluation, and nothing else; a
    template naming a missing column fails on the first rows, before anything else is downloaded."""
    caplog.set_level(logging.DEBUG, logger="dpo_dev.hub")
    source = {"hub": {"name": sharded_on_hub, "dataDir": "data/rl"}}
    evaluation = {"hub": {"name": sharded_on_hub, "dataDir": "data/evaluation"}}
    job = quickstart_job(quantization={"mode": "none"}, sft={"enabled": False}, dpo={"maxSteps": 3})
    job["spec"]["data"] = {
        "preset": "none",
        "dpo": {**job["spec"]["data"]["dpo"], "source": source, "evalSource": evaluation, "evalSize": 8},
    }
    job["spec"]["data"]["dpo"]["chosenTemplate"] = chosen
    run = run_cli(job, tmp_path, "sharded", env=hub_env(hub))
    if chosen == "{answer}":
        assert_failed(run, "DatasetError", "data.dpo.chosenTemplate refers to column 'answer'")
        assert _downloaded(caplog) == ["data/rl/train-00000-of-00003.parquet"]
        return
    assert run.returncode == 0, run.stderr[-3000:]
    assert _downloaded(caplog) == [
        "data/evaluation/train-00000-of-00001.parquet",
        "data/rl/train-00000-of-00003.parquet",
    ]
    assert run.summary()["data"]["sources"]["data.dpo.source"] == {
        "rowsRead": 12,
        "filesRead": 1,
        "files": 3,
        "wholeSplit": False,
    }
    assert "data.dpo.source.hub: dataset 'tester/stack-exchange-sharded': read 12 rows from 1 of 3 files" in run.stderr
