"""Spec → device, precision, Trainer/PEFT/bitsandbytes settings, and the 4-bit NF4 load on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo_trainer import models
from dpo_trainer.errors import GPUUnavailable
from dpo_trainer.models import (
    CudaProbe,
    check_device,
    gpu_unavailable_message,
    load_model,
    load_tokenizer,
    lora_config,
    nvidia_driver_version,
    quantization_config,
    select_precision,
    trainable_in_fp32,
    trainer_arguments,
)
from dpo_trainer.specfile import load_job
from dpo_trainer.training import dpo_config, sft_config
from dpojob_api.spec import DPOJobSpec, DPOSpec, SFTSpec

from .conftest import QUICKSTART, TINY_MODEL


def test_trainer_arguments_follow_the_spec_on_cpu() -> None:
    spec = load_job(QUICKSTART).spec
    spec.reporting.report_to = ["none", "tensorboard"]
    args = trainer_arguments(spec, spec.dpo, "/tmp/x", has_eval=True)
    assert args["use_cpu"] is True and args["bf16"] is False and args["fp16"] is False
    assert args["max_steps"] == 40 and args["learning_rate"] == 2e-3 and args["max_length"] == 128
    assert args["per_device_train_batch_size"] == 4 and args["gradient_accumulation_steps"] == 1
    assert args["optim"] == "adamw_torch" and args["lr_scheduler_type"] == "cosine" and args["warmup_steps"] == 4
    assert args["activation_checkpointing"] is False
    assert args["eval_strategy"] == "steps" and args["eval_steps"] == 20
    assert args["save_steps"] == 20 and args["save_total_limit"] == 2
    assert args["report_to"] == ["tensorboard"] and args["seed"] == 0
    assert trainer_arguments(spec, spec.sft, "/tmp/x", has_eval=False)["eval_strategy"] == "no"
    spec.reporting.report_to = ["none"]
    assert trainer_arguments(spec, spec.sft, "/tmp/x", has_eval=False)["report_to"] == "none"


def test_seed_dpo_defaults_map_to_the_seed_recipe() -> None:
    """dpo_llama2.py: gradient checkpointing, weight decay 0.05, LoRA on q/k/v (its other targets are not Llama's)."""
    spec = load_job(QUICKSTART).spec
    spec.dpo = DPOSpec()  # the seed's DPO hyperparameters
    config = dpo_config(spec, "/tmp/x", has_eval=True)
    assert config.activation_checkpointing is True and config.optim == "paged_adamw_32bit"
    assert config.gradient_accumulation_steps == 4 and config.max_steps == 1000 and config.learning_rate == 5e-4
    assert config.per_device_train_batch_size == 4 and config.max_length == 1024 and config.weight_decay == 0.05
    assert config.lr_scheduler_type == "cosine" and config.warmup_steps == 100
    assert config.use_cpu is True and config.bf16 is False and config.beta == 0.1
    assert config.loss_type == ["sigmoid"] and config.label_smoothing == 0
    lora = lora_config(spec.dpo.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (8, 16, 0.05, "none")
    assert set(lora.target_modules) == {"q_proj", "v_proj", "k_proj"}


def test_seed_sft_defaults_map_to_the_seed_recipe() -> None:
    """sft_llama2.py as the post ran it: --gradient_checkpointing=False --weight_decay=0.05, packing to 1024."""
    spec = load_job(QUICKSTART).spec
    spec.sft = SFTSpec()  # the seed's SFT hyperparameters
    config = sft_config(spec, "/tmp/x", has_eval=True)
    assert config.max_steps == 500 and config.learning_rate == 1e-4 and config.weight_decay == 0.05
    assert config.per_device_train_batch_size == 4 and config.gradient_accumulation_steps == 2
    assert config.packing is True and config.max_length == 1024
    assert config.activation_checkpointing is False and config.optim == "paged_adamw_32bit"
    assert config.lr_scheduler_type == "cosine" and config.warmup_steps == 100
    lora = lora_config(spec.sft.lora)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (8, 16, 0.05, "none")
    assert set(lora.target_modules) == {"q_proj", "v_proj"}


@pytest.mark.parametrize(("loss_type", "smoothing"), [(["exo_pair"], 1e-3), (["robust"], 0.1)])
def test_label_smoothed_losses_reach_trl(loss_type: list[str], smoothing: float) -> None:
    """TRL refuses exo_pair without label_smoothing (and robust is plain sigmoid without it)."""
    from datasets import Dataset
    from trl import DPOTrainer

    spec = load_job(QUICKSTART).spec
    spec.dpo = DPOSpec.model_validate({**spec.dpo.model_dump(), "loss_type": loss_type, "label_smoothing": smoothing})
    config = dpo_config(spec, "/tmp/x", has_eval=False)
    assert config.label_smoothing == smoothing
    pairs = Dataset.from_list([{"prompt": "Question: q?\n\nAnswer: ", "chosen": "yes", "rejected": "no"}] * 4)
    trainer = DPOTrainer(
        model=load_model(spec, str(TINY_MODEL)),
        args=config,
        train_dataset=pairs,
        processing_class=load_tokenizer(spec, str(TINY_MODEL), None, None),
        peft_config=lora_config(spec.dpo.lora),
    )
    assert trainer.label_smoothing == smoothing and trainer.loss_types == loss_type


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_load_runs_on_cpu(quant_type: str) -> None:
    """bitsandbytes' CPU backend: Linear4bit layers with the requested data type, QLoRA-prepared."""
    import torch

    spec = load_job(QUICKSTART).spec
    spec.quantization.quant_type = quant_type
    model = load_model(spec, str(TINY_MODEL), training=True)
    assert model.is_loaded_in_4bit
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "Linear4bit" and q_proj.weight.quant_type == quant_type
    assert not any(p.requires_grad for p in model.parameters())  # frozen base, ready for an adapter
    logits = model(torch.tensor([[0, 5, 9]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size) and torch.isfinite(logits).all()


def test_qlora_gradients_survive_an_evaluation_on_cpu() -> None:
    """Regression: bitsandbytes' CPU eval repacking used to cut every gradient through the 4-bit layers."""
    import torch
    from peft import LoraConfig, get_peft_model

    spec = load_job(QUICKSTART).spec
    lora = LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(load_model(spec, str(TINY_MODEL), training=True), lora)
    tokens = torch.tensor([[0, 5, 9, 33, 44, 55]])
    grads = []
    for _ in range(2):
        model.train()
        model.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        grads.append(next(p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_A" in n))
        model.eval()
        with torch.no_grad():
            model(tokens)
    assert grads[1] is not None and torch.allclose(grads[0], grads[1])


SEED = DPOJobSpec.model_validate({"output": {"directory": "/o"}})  # bf16 model, 4-bit with bf16 compute
QUICKSTART_SPEC = load_job(QUICKSTART).spec  # fp32 model, 4-bit with fp32 compute, runtime.gpus 0
UNQUANTIZED_FP16 = DPOJobSpec.model_validate(
    {"output": {"directory": "/o"}, "model": {"dtype": "float16"}, "quantization": {"mode": "none"}}
)
FALLBACK = "no native bfloat16"


@pytest.mark.parametrize(
    ("spec", "cuda", "bf16", "expected"),
    [
        (SEED, True, True, ("bf16", "bfloat16", "bfloat16", None)),
        (SEED, True, False, ("fp16", "float16", "float16", FALLBACK)),  # T4, V100
        (SEED, False, False, (None, "bfloat16", "bfloat16", None)),  # CPU computes in the loaded dtypes
        (QUICKSTART_SPEC, True, False, (None, "float32", "float32", None)),
        (QUICKSTART_SPEC, False, False, (None, "float32", "float32", None)),
        (UNQUANTIZED_FP16, True, True, ("fp16", "bfloat16", "float16", None)),  # model.dtype decides without 4-bit
        (UNQUANTIZED_FP16, True, False, ("fp16", "float16", "float16", FALLBACK)),
    ],
)
def test_precision_follows_the_spec_and_the_gpu(
    spec: DPOJobSpec, cuda: bool, bf16: bool, expected: tuple[str | None, str, str, str | None]
) -> None:
    chosen = select_precision(spec, cuda=cuda, bf16=bf16)
    mixed, compute_dtype, model_dtype, note = expected
    assert (chosen.mixed, chosen.compute_dtype, chosen.model_dtype) == (mixed, compute_dtype, model_dtype)
    assert (note is None and chosen.note is None) or (note is not None and note in (chosen.note or ""))


def test_a_gpu_without_bf16_trains_the_seed_recipe_in_fp16(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trainer flags, the 4-bit compute dtype and the warning agree; the merges keep model.dtype."""
    import torch

    monkeypatch.setattr(models, "cuda_available", lambda: True)
    monkeypatch.setattr(models, "bf16_supported", lambda: False)
    check_device(SEED)
    assert capsys.readouterr().err.startswith("dpo-trainer: warning: this GPU has no native bfloat16")
    args = trainer_arguments(SEED, SEED.dpo, "/tmp/x", has_eval=True)
    assert (args["use_cpu"], args["bf16"], args["fp16"]) == (False, False, True)
    config = quantization_config(SEED)
    assert config is not None and config.bnb_4bit_compute_dtype == torch.float16
    assert models.precision(SEED).model_dtype == "float16" and SEED.model.dtype == "bfloat16"
    monkeypatch.setattr(models, "bf16_supported", lambda: True)
    args = trainer_arguments(SEED, SEED.dpo, "/tmp/x", has_eval=True)
    assert (args["use_cpu"], args["bf16"], args["fp16"]) == (False, True, False)


def test_runtime_gpus_zero_trains_on_cpu_even_where_cuda_works(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod that requested no GPU must not use one the container runtime happens to show it."""
    monkeypatch.setattr(models, "cuda_available", lambda: True)
    spec = SEED.model_copy(deep=True)
    spec.runtime.gpus = 0
    check_device(spec)
    args = trainer_arguments(spec, spec.dpo, "/tmp/x", has_eval=True)
    assert (args["use_cpu"], args["bf16"], args["fp16"]) == (True, False, False)
    assert models.device_map(spec) is None


def test_gpus_asked_for_but_unusable_fail_with_gpu_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "cuda_available", lambda: False)
    monkeypatch.setattr(models, "probe_cuda", lambda: CudaProbe("2.13.0+cu130", "13.0", "570.86.15", 0, {}))
    with pytest.raises(GPUUnavailable, match=r"spec.runtime.gpus is 1 but torch cannot use CUDA") as failed:
        check_device(SEED)
    assert "NVIDIA driver 570.86.15" in failed.value.message and ">= 580" in failed.value.message


def test_gpu_unavailable_message_says_what_was_found_and_what_to_do() -> None:
    cpu_build = gpu_unavailable_message(1, CudaProbe("2.13.0+cpu", None, None, 0, {}))
    assert cpu_build == (
        "spec.runtime.gpus is 1 but torch cannot use CUDA: torch 2.13.0+cpu is a CPU-only build; no NVIDIA driver "
        "found; 0 CUDA devices visible; CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES unset. To use the GPU: a "
        "CUDA build of torch, as in the trainer image (CUDA 13.0, an NVIDIA driver >= 580 on the node), and the "
        "NVIDIA device plugin giving the pod nvidia.com/gpu; or set spec.runtime.gpus: 0 to train on CPU"
    )
    old_driver = gpu_unavailable_message(
        2, CudaProbe("2.13.0+cu130", "13.0", "535.104.05", 0, {"NVIDIA_VISIBLE_DEVICES": "void"})
    )
    assert "torch 2.13.0+cu130 is built for CUDA 13.0; NVIDIA driver 535.104.05; 0 CUDA devices visible" in old_driver
    assert "NVIDIA_VISIBLE_DEVICES='void'. To use the GPU: an NVIDIA driver >= 580 on the node, and" in old_driver
    cuda12 = gpu_unavailable_message(1, CudaProbe("2.5.1+cu121", "12.1", None, 0, {"CUDA_VISIBLE_DEVICES": ""}))
    assert "no NVIDIA driver found" in cuda12 and "CUDA_VISIBLE_DEVICES=''" in cuda12 and ">= 525" in cuda12
    assert "\n" not in cuda12


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\nGCC version:",
            "535.104.05",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16)",
            "580.65.06",
        ),
        ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  575.57  Thu May 22 2025", "575.57"),
    ],
)
def test_the_driver_version_is_read_from_proc(tmp_path: Path, text: str, version: str) -> None:
    proc = tmp_path / "version"
    proc.write_text(text)
    assert nvidia_driver_version(proc) == version


def test_no_driver_reads_as_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert nvidia_driver_version(tmp_path / "missing") is None


def test_qlora_adapter_weights_train_in_fp32() -> None:
    """TRL 1.16 casts a quantized model's trainable weights to bf16; the seed trained fp32 adapters."""
    import torch
    from datasets import Dataset
    from trl import DPOTrainer

    spec = QUICKSTART_SPEC
    pairs = Dataset.from_list([{"prompt": "Question: q?\n\nAnswer: ", "chosen": "yes", "rejected": "no"}] * 4)
    trainer = DPOTrainer(
        model=load_model(spec, str(TINY_MODEL), training=True),
        args=dpo_config(spec, "/tmp/x", has_eval=False),
        train_dataset=pairs,
        processing_class=load_tokenizer(spec, str(TINY_MODEL), None, None),
        peft_config=lora_config(spec.dpo.lora),
    )
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.bfloat16}  # what TRL does
    trainable_in_fp32(trainer.model)
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {p.dtype for p in after} == {torch.float32}
    assert all(a is b for a, b in zip(trainable, after, strict=True))  # same Parameters: the optimizer gets these
