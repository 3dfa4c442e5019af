"""The spec model: seed defaults, presets, and messages that name the field."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dpojob_api.spec import DPOJob, DPOJobSpec, describe_validation_error, template_fields

OUT = {"output": {"directory": "/output/model"}}
LLAMA2_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llama2-stack-exchange.yaml"


def errors_of(raw: dict) -> str:
    with pytest.raises(ValidationError) as info:
        DPOJobSpec.model_validate(raw)
    return describe_validation_error(info.value)


def test_defaults_are_the_seed_recipe() -> None:
    spec = DPOJobSpec.model_validate(OUT)
    assert spec.model.name == "meta-llama/Llama-2-7b-hf"
    assert (spec.sft.learning_rate, spec.sft.max_steps, spec.sft.batch_size, spec.sft.gradient_accumulation_steps) == (
        1e-4,
        500,
        4,
        2,
    )
    assert (spec.dpo.beta, spec.dpo.learning_rate, spec.dpo.max_steps, spec.dpo.gradient_accumulation_steps) == (
        0.1,
        5e-4,
        1000,
        4,
    )
    assert (spec.dpo.max_prompt_length, spec.dpo.max_length, spec.dpo.loss_type) == (512, 1024, ["sigmoid"])
    assert spec.sft.optimizer == spec.dpo.optimizer == "paged_adamw_32bit"
    assert spec.sft.weight_decay == spec.dpo.weight_decay == 0.05
    assert (spec.sft.gradient_checkpointing, spec.dpo.gradient_checkpointing) == (False, True)
    assert spec.dpo.label_smoothing == 0
    assert (spec.sft.lora.r, spec.sft.lora.alpha, spec.sft.lora.dropout) == (8, 16, 0.05)
    assert (spec.dpo.lora.r, spec.dpo.lora.alpha, spec.dpo.lora.dropout) == (8, 16, 0.05)
    assert (spec.sft.lora.target_modules, spec.dpo.lora.target_modules) == (
        ["q_proj", "v_proj"],
        ["q_proj", "v_proj", "k_proj"],
    )
    assert spec.quantization.mode == "4bit" and spec.quantization.quant_type == "nf4"
    assert spec.output.hub is None and spec.runtime.gpus == 1


def test_llama2_example_spells_out_the_defaults() -> None:
    """examples/llama2-stack-exchange.yaml says its training values are the seed's and the spec's defaults."""
    example = DPOJob.model_validate(yaml.safe_load(LLAMA2_EXAMPLE.read_text())).spec
    defaults = DPOJobSpec.model_validate(OUT)
    for section in ("model", "data", "sft", "dpo", "quantization", "seed"):
        assert getattr(example, section) == getattr(defaults, section), section


def test_stack_exchange_preset_reproduces_the_seed_mapping() -> None:
    data = DPOJobSpec.model_validate(OUT).data
    assert data.sft.source.hub.name == "lvwerra/stack-exchange-paired"
    assert data.sft.source.hub.data_dir == "data/finetune"
    assert data.sft.text_template == "Question: {question}\n\nAnswer: {response_j}"
    assert data.sft.eval_size == 4000
    assert data.dpo.source.hub.data_dir == "data/rl"
    assert data.dpo.eval_source.hub.data_dir == "data/evaluation"
    assert data.dpo.eval_size == 1000  # the seed evaluated on the first 1000 rows of data/evaluation
    assert data.dpo.prompt_template == "Question: {question}\n\nAnswer: "
    assert template_fields(data.dpo.chosen_template) == ["response_j"]
    assert template_fields(data.dpo.rejected_template) == ["response_k"]


def test_preset_fills_only_what_is_missing() -> None:
    spec = DPOJobSpec.model_validate({**OUT, "data": {"dpo": {"evalSize": 50}}})
    assert spec.data.dpo.eval_size == 50 and spec.data.dpo.source.hub.data_dir == "data/rl"
    lora = DPOJobSpec.model_validate({**OUT, "dpo": {"lora": {"r": 16}}}).dpo.lora
    assert (lora.r, lora.target_modules) == (16, ["q_proj", "v_proj", "k_proj"])  # the DPO default, not SFT's


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({**OUT, "dpo": {"beta": 0}}, "spec.dpo.beta: Input should be greater than 0"),
        ({**OUT, "dpo": {"bata": 0.2}}, "spec.dpo.bata: unknown field"),
        ({**OUT, "sft": {"maxSteps": "many"}}, "spec.sft.maxSteps: Input should be a valid integer"),
        ({**OUT, "quantization": {"mode": "3bit"}}, "spec.quantization.mode: must be one of '4bit' or 'none'"),
        ({}, "spec: output needs hub or directory"),
        ({**OUT, "dpo": {"lossType": ["sigmoid", "sft"], "lossWeights": [1.0]}}, "lossWeights has 1 entries"),
        ({**OUT, "dpo": {"maxPromptLength": 2048}}, "maxPromptLength (2048) must be less than maxLength (1024)"),
        ({**OUT, "output": {"hub": {"repoId": "no-namespace"}}}, "spec.output.hub.repoId: String should match"),
        ({**OUT, "dpo": {"lossType": ["exo_pair"]}}, "lossType exo_pair needs spec.dpo.labelSmoothing > 0"),
        (
            {**OUT, "dpo": {"lossType": ["robust", "sft"], "lossWeights": [1, 1]}},
            "lossType robust needs spec.dpo.labelSmoothing > 0",
        ),
        ({**OUT, "dpo": {"labelSmoothing": 0.5}}, "spec.dpo.labelSmoothing: Input should be less than 0.5"),
    ],
)
def test_bad_input_names_the_field(raw: dict, expected: str) -> None:
    assert expected in errors_of(raw)


def test_dataset_source_needs_exactly_one_kind() -> None:
    raw = {
        **OUT,
        "data": {
            "preset": "none",
            "dpo": {"source": {}, "promptTemplate": "{q}", "chosenTemplate": "{a}", "rejectedTemplate": "{b}"},
        },
        "sft": {"enabled": False},
    }
    assert "spec.data.dpo.source: set exactly one of hub or files" in errors_of(raw)


def test_a_stage_with_its_own_source_does_not_inherit_the_preset_eval_source() -> None:
    own = {"source": {"files": {"paths": ["/data/p.jsonl"]}}}
    data = DPOJobSpec.model_validate({**OUT, "data": {"dpo": own}}).data
    assert data.dpo.eval_source is None and data.dpo.prompt_template.startswith("Question: ")
    assert data.dpo.eval_size == 0  # the preset's cap of its eval source would hold rows out of this one


def test_label_smoothing_makes_exo_pair_and_robust_valid() -> None:
    dpo = DPOJobSpec.model_validate({**OUT, "dpo": {"lossType": ["exo_pair", "robust"], "labelSmoothing": 0.1}}).dpo
    assert dpo.label_smoothing == 0.1
    assert "exo_pair and robust needs" in errors_of({**OUT, "dpo": {"lossType": ["exo_pair", "robust"]}})


def test_whole_document_is_read() -> None:
    job = DPOJob.model_validate(
        {"apiVersion": "dpo-operator.io/v1alpha1", "kind": "DPOJob", "metadata": {"name": "x"}, "spec": OUT}
    )
    assert job.spec.output.directory == "/output/model"


def test_a_files_source_takes_its_format_from_the_extension_or_names_format() -> None:
    """A .parquet path with no format is read as parquet; a format the paths contradict, or paths whose extension
    says nothing, fail at once with a message naming `format` (never a loader error after the download)."""

    def spec(files: dict) -> DPOJobSpec:
        source = {"files": files}
        return DPOJobSpec.model_validate({"data": {"dpo": {"source": source}}, "output": {"directory": "/o"}})

    def files_of(parsed: DPOJobSpec):
        return parsed.data.dpo.source.files

    assert files_of(spec({"paths": ["/data/pairs-*.parquet"]})).builder == "parquet"
    assert files_of(spec({"paths": ["/data/a.jsonl.gz", "/data/b.json"]})).builder == "json"
    assert files_of(spec({"paths": ["/data/shard-*"], "format": "parquet"})).builder == "parquet"
    for files, said in (
        ({"paths": ["/data/pairs.parquet"], "format": "jsonl"}, "does not match"),
        ({"paths": ["/data/pairs-*"]}, "cannot tell the file format"),
        ({"paths": ["/data/a.parquet", "/data/b.jsonl"]}, "cannot tell the file format"),
    ):
        with pytest.raises(ValidationError) as refused:
            spec(files)
        message = describe_validation_error(refused.value)
        assert "spec.data.dpo.source.files" in message and "format" in message and said in message, message
