"""Loading models and tokenizers, and mapping the spec onto PEFT / bitsandbytes / Trainer settings.

One place decides device and precision: CUDA when present (bf16/fp16 mixed precision per the spec),
otherwise CPU in the dtype the spec asks for, with mixed precision off (TRL configs would default to
bf16=True and refuse to start on CPU).
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from dpo_trainer.errors import ModelLoadError, reraise
from dpojob_api.spec import DPOJobSpec, LoRASpec, TrainingSpec

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase


@cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def device_map() -> dict[str, int] | None:
    """Each rank keeps its whole (quantized) model on its own GPU; CPU needs no map."""
    if not cuda_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def quantization_config(spec: DPOJobSpec) -> BitsAndBytesConfig | None:
    if spec.quantization.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    q = spec.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_use_double_quant=q.double_quant,
    )


def load_tokenizer(spec: DPOJobSpec, path: str, revision: str | None, token: str | None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; a missing pad token falls back to EOS (as in the seed)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=spec.model.trust_remote_code, token=token
        )
    except Exception as exc:
        reraise(exc, ModelLoadError, f"loading the tokenizer of {path}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: DPOJobSpec,
    path: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    quantized: bool = False,
) -> PreTrainedModel:
    """Load a causal LM in model.dtype, or 4-bit (QLoRA-ready) when asked and the spec enables it."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(spec) if quantized else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            dtype=torch_dtype(spec.model.dtype),
            quantization_config=quant,
            device_map=device_map(),
            trust_remote_code=spec.model.trust_remote_code,
            token=token,
        )
    except Exception as exc:
        reraise(exc, ModelLoadError, f"loading model {path}")
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_weights_trainable_on_cpu(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes 0.50 from repacking 4-bit weights for its CPU inference kernel during evaluation.

    On CPUs with AVX512-BF16, the first eval-mode forward converts every Linear4bit to a layout served by
    `gemv_4bit`, which has no backward: all later training steps silently get no gradient through the
    frozen layers, so most LoRA adapters stop learning. The flag below is what gates that conversion.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(lora: LoRASpec) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def trainer_arguments(spec: DPOJobSpec, stage: TrainingSpec, output_dir: str, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments shared by SFTConfig and DPOConfig, straight from the spec."""
    cuda = cuda_available()
    precision = spec.quantization.compute_dtype if spec.quantization.mode == "4bit" else spec.model.dtype
    report_to = [r for r in spec.reporting.report_to if r != "none"]
    return {
        "output_dir": output_dir,
        "max_steps": stage.max_steps,
        "num_train_epochs": stage.num_train_epochs,
        "learning_rate": stage.learning_rate,
        "lr_scheduler_type": stage.lr_scheduler_type,
        "warmup_steps": stage.warmup_steps,
        "per_device_train_batch_size": stage.batch_size,
        "per_device_eval_batch_size": stage.batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "max_length": stage.max_length,
        "optim": stage.optimizer,
        "weight_decay": stage.weight_decay,
        "activation_checkpointing": stage.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if stage.gradient_checkpointing else None,
        "logging_steps": stage.logging_steps,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": stage.eval_steps,
        "save_strategy": "steps",
        "save_steps": spec.checkpointing.save_steps,
        "save_total_limit": spec.checkpointing.save_total_limit,
        "report_to": report_to or "none",
        "seed": spec.seed,
        "data_seed": spec.seed,
        "use_cpu": not cuda,
        "bf16": cuda and precision == "bfloat16",
        "fp16": cuda and precision == "float16",
        "disable_tqdm": False,
        "enable_jit_checkpoint": True,
        "ddp_find_unused_parameters": False,
    }
