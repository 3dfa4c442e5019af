"""Spec → Trainer/PEFT/bitsandbytes settings, and the 4-bit NF4 load on CPU."""

from __future__ import annotations

import pytest

from dpo_trainer.models import load_model, load_tokenizer, lora_config, trainer_arguments
from dpo_trainer.specfile import load_job
from dpo_trainer.training import dpo_config, sft_config
from dpojob_api.spec import DPOSpec, SFTSpec

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
    model = load_model(spec, str(TINY_MODEL), quantized=True)
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
    model = get_peft_model(load_model(spec, str(TINY_MODEL), quantized=True), lora)
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
