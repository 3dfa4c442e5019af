"""Template rendering, hold-out and prompt-length filtering of the data stage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_from_disk

from dpo_dev.hub import LocalHub
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.data import Template, drop_long_prompts, hold_out, limit, load_source, render
from dpo_trainer.data import run as data_stage
from dpo_trainer.errors import DatasetError
from dpo_trainer.layout import CARD_FILE, RunLayout
from dpo_trainer.models import load_tokenizer
from dpo_trainer.progress import Reporter
from dpo_trainer.specfile import load_job, resolve_local_paths
from dpojob_api.spec import DatasetSource, DPOJob, DPOJobSpec

from .conftest import QUICKSTART, TINY_DATA, TINY_MODEL, hub_env, quickstart_job, run_cli

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


def _data_stage(spec: DPOJobSpec, out_dir: Path) -> dict[str, int]:
    """Run the data stage alone; its row counts."""
    layout = RunLayout(out_dir)
    data_stage(RunContext(spec, layout, Reporter(io.StringIO()), None, RunState(layout.state)))
    return json.loads(layout.data_stats.read_text())


def test_eval_size_caps_a_separate_eval_source(tmp_path: Path) -> None:
    """The seed evaluated on the first 1000 rows of data/evaluation, not on all of it at every evaluation."""
    job = quickstart_job(sft={"enabled": False})
    job["spec"]["data"]["dpo"]["evalSource"] = {"files": {"paths": [str(TINY_DATA)]}}
    job["spec"]["data"]["dpo"]["evalSize"] = 10
    spec = resolve_local_paths(DPOJob.model_validate(job).spec)
    assert _data_stage(spec, tmp_path / "capped") == {
        "dpo_train": 320,
        "dpo_eval": 10,
        "dpo_train_dropped_long_prompts": 0,
    }
    first_rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()[:10]]
    evaluation = load_from_disk(str(RunLayout(tmp_path / "capped").split("dpo", "eval")))
    assert evaluation["chosen"] == [row["response_j"] for row in first_rows]
    spec.data.dpo.eval_size = 0
    assert _data_stage(spec, tmp_path / "all")["dpo_eval"] == 320


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
    assert list(run.stage_ends()) == ["data", "dpo", "dpo_merge", "model_card"]
    summary = run.summary()
    assert summary["data"] == {"dpo_train": 200, "dpo_eval": 40, "dpo_train_dropped_long_prompts": 0}
    assert summary["sftMetrics"] == {} and "eval_rewards/margins" in summary["metrics"]
    card = (tmp_path / "final-model" / CARD_FILE).read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["datasets"] == [stack_exchange_on_hub] and "sft" not in front["tags"]
    assert "## SFT results" not in card


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
