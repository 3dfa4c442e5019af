"""The preflight: counts from config.json alone, a peak-memory estimate per training stage, and a misfit that fails
in seconds, before anything is downloaded or trained."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from dpo_trainer import preflight
from dpo_trainer.errors import InvalidSpec, OutputNotWritable
from dpo_trainer.models import lora_config
from dpojob_api.spec import DPOJobSpec
from dpojob_api.vocabulary import Stage

from .conftest import TINY_MODEL, assert_failed, quickstart_job, run_cli

LLAMA_2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def _spec(**overrides: object) -> DPOJobSpec:
    return DPOJobSpec.model_validate({"output": {"directory": "/o"}, **overrides})


def test_llama_2_7b_is_counted_exactly_from_its_config_on_the_meta_device() -> None:
    started = time.monotonic()
    shape = preflight.model_shape(_spec(), LLAMA_2_7B)
    assert time.monotonic() - started < 5, "no weights are allocated"
    assert shape.linear_params + shape.other_params == 6_738_415_616  # Llama-2-7B's published parameter count
    assert shape.other_params == 2 * 32000 * 4096 + 65 * 4096  # embeddings, lm_head, RMSNorm weights
    assert shape.lora_params == {"sft": 32 * 2 * 8 * (4096 + 4096), "dpo": 32 * 3 * 8 * (4096 + 4096)}


def test_the_estimate_moves_with_the_knobs_the_message_names() -> None:
    spec = _spec()
    shape = preflight.model_shape(spec, LLAMA_2_7B)
    sft = preflight.estimate(spec, shape, Stage.SFT)
    assert 3.5 < sft.weights / preflight.GIB < 4.0, "4-bit weights of a 7B model"
    checkpointed = preflight.estimate(_spec(sft={"gradientCheckpointing": True}), shape, Stage.SFT)
    assert checkpointed.activations < sft.activations / 5 and checkpointed.weights == sft.weights
    halved = preflight.estimate(_spec(sft={"batchSize": 2}), shape, Stage.SFT)
    assert halved.activations == sft.activations // 2 and halved.logits == sft.logits // 2
    dpo = preflight.estimate(spec, shape, Stage.DPO)  # chosen and rejected rows: twice the logits per batch
    assert dpo.logits == 2 * sft.logits
    unquantized = preflight.estimate(_spec(quantization={"mode": "none"}), shape, Stage.SFT)
    assert unquantized.weights == 6_738_415_616 * 2 > 3 * sft.weights


def test_counts_match_the_real_tiny_model_and_its_adapter(tmp_path: Path) -> None:
    """What can be measured on a CPU: the parameter bytes of the loaded model, PEFT's trainable parameters."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    spec = _spec(model={"name": str(TINY_MODEL)}, quantization={"mode": "none"})
    shape = preflight.model_shape(spec, json.loads((TINY_MODEL / "config.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.bfloat16)
    estimate = preflight.estimate(spec, shape, Stage.DPO)
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    adapted = get_peft_model(model, lora_config(spec.dpo.lora))
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert shape.lora_params[Stage.DPO] == trainable


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _kept_for_backward(spec: DPOJobSpec, stage: Stage, config: dict) -> int:
    """Bytes autograd keeps for the backward pass of one forward (saved_tensors_hooks; parameters left out), in
    bf16, with the stage's LoRA as the trainer applies it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    section = spec.sft if stage == Stage.SFT else spec.dpo
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to(torch.bfloat16)
    model = get_peft_model(model, lora_config(section.lora)).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    rows = section.batch_size * (2 if stage == Stage.DPO else 1)
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(input_ids=torch.randint(0, config["vocab_size"], (rows, section.max_length)))
    return sum(saved.values())


@pytest.mark.parametrize(("stage", "targets"), [(Stage.SFT, None), (Stage.DPO, None), (Stage.DPO, ALL_LINEAR)])
def test_activations_per_layer_match_what_autograd_keeps(stage: Stage, targets: list[str] | None) -> None:
    """What can be measured on a CPU: a Llama-shaped model (Llama 2's intermediate/hidden ratio), its layers'
    activations as the difference between 4 and 2 layers, against the estimate's per-layer term (no checkpointing):
    within 10 %, for the default LoRA targets of each stage and for every linear layer targeted."""
    lora = {"targetModules": targets} if targets else {}
    spec = _spec(
        sft={"batchSize": 2, "maxLength": 256, "gradientCheckpointing": False, "lora": lora},
        dpo={"batchSize": 1, "maxLength": 256, "maxPromptLength": 128, "gradientCheckpointing": False, "lora": lora},
    )
    shaped = {**LLAMA_2_7B, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4}
    shaped.update(num_key_value_heads=4, vocab_size=1000, max_position_embeddings=1024)
    two, four = ({**shaped, "num_hidden_layers": layers} for layers in (2, 4))
    measured = (_kept_for_backward(spec, stage, four) - _kept_for_backward(spec, stage, two)) / 2
    estimated = preflight.estimate(spec, preflight.model_shape(spec, two), stage).activations / 2
    assert abs(estimated - measured) / measured < 0.10, f"estimated {estimated:.0f} B, measured {measured:.0f}"


@pytest.mark.parametrize(("text", "expected"), [("17179869184", 16 << 30), ("16Gi", 16 << 30), ("80G", 80 * 10**9)])
def test_gpu_memory_quantities(text: str, expected: int) -> None:
    assert preflight.parse_bytes(text) == expected


def test_a_gpu_memory_quantity_that_is_not_one_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="DPO_GPU_MEMORY"):
        preflight.parse_bytes("lots")


def test_a_model_that_cannot_fit_fails_in_seconds_before_any_stage(tmp_path: Path) -> None:
    started = time.monotonic()
    run = run_cli(quickstart_job(), tmp_path, env={preflight.GPU_MEMORY_ENV: "64Mi"})
    assert_failed(run, "InsufficientGPUMemory", "sft needs about", "the GPU has 0.1 GiB", "lower sft.batchSize")
    assert not [e for e in run.events if e["event"] == "stage_start"], "nothing downloaded, nothing trained"
    assert time.monotonic() - started < 60


def test_a_fitting_run_reports_its_estimate(tmp_path: Path) -> None:
    run = run_cli(quickstart_job(sft={"enabled": False}, dpo={"maxSteps": 2}), tmp_path, env={"DPO_GPU_MEMORY": "1Gi"})
    assert run.returncode == 0, run.stderr[-3000:]
    (event,) = [e for e in run.events if e["event"] == "preflight"]
    assert set(event["estimates"]) == {"dpo"} and 0 < event["estimates"]["dpo"] < 1 and event["gpuMemoryGiB"] == 1.0


def _unwritable(tmp_path: Path) -> Path:
    """A directory nobody can create: under a read-only directory, or for root (who writes through modes) on sysfs."""
    if os.geteuid() == 0:
        return Path("/sys/dpo-trainer-test/out")
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o555)
    return locked / "out"


def test_an_output_directory_that_cannot_be_written_fails_before_anything_else(tmp_path: Path) -> None:
    target = _unwritable(tmp_path)
    spec = _spec(output={"directory": str(target)})
    with pytest.raises(OutputNotWritable) as refused:
        preflight.check_writable(spec, tmp_path / "work")
    assert str(refused.value).startswith(f"spec.output.directory {str(target)!r} is not writable")
    assert "spec.runtime.outputVolume" in str(refused.value)
    with pytest.raises(OutputNotWritable, match="the work directory"):
        preflight.check_writable(_spec(), target)
    preflight.check_writable(_spec(output={"directory": str(tmp_path / "model")}), tmp_path / "work")
    assert (tmp_path / "model").is_dir() and not list((tmp_path / "model").iterdir()), "the probe is removed"


def test_an_unwritable_output_directory_fails_the_run_in_seconds(tmp_path: Path) -> None:
    target = _unwritable(tmp_path)
    run = run_cli(quickstart_job(output={"directory": str(target)}), tmp_path)
    assert_failed(run, "OutputNotWritable", f"spec.output.directory {str(target)!r}")
    assert not [e for e in run.events if e["event"] in ("preflight", "stage_start")], "nothing read or downloaded"
