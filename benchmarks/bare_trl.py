"""The baseline of the trainer benchmarks: a bare TRL script doing what `dpo-trainer run` does, and its config.

`SCRIPT` uses datasets, SFTTrainer, DPOTrainer and PEFT directly, in one process, every import at the top:
render the rows, hold out the eval rows, shuffle the SFT rows as the seed did and keep what max_steps consume,
drop long prompts and keep the pairs max_steps consume, QLoRA SFT, merge the SFT adapter into the base,
DPO with a fresh LoRA on the merged model (reference: the adapter disabled), merge the DPO adapter. Nothing of
what is ours alone (progress events, resumable state, model card, summary). `config()` derives every setting
from the same validated DPOJob spec our CLI runs, so both sides train the same thing.

The script writes OUT/bare_result.json: its start/import/finish times, each stage's Trainer log history, a
timeline (each log with its wall time, for step times), the peak GPU memory per stage (CUDA only) and the
native bitsandbytes library it loaded.
"""

from __future__ import annotations

from typing import Any

from dpojob_api.spec import DPOJobSpec

SHUFFLE_BUFFER = 5000
"""The seed's shuffle(buffer_size=5000) of its streamed SFT rows."""

SCRIPT = r'''
"""Bare TRL: SFT (QLoRA) -> merge -> DPO (fresh LoRA, 4-bit) -> merge, configured by a JSON file."""
import time

started = time.time()
import json
import sys
from pathlib import Path

import bitsandbytes.cextension
import numpy as np
import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

imported = time.time()
cfg = json.loads(Path(sys.argv[1]).read_text())
out = cfg["out"]
dtype = getattr(torch, cfg["dtype"])
cuda = torch.cuda.is_available()
tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token


class Timeline(TrainerCallback):
    """Each log with the wall time it was made at."""

    def __init__(self):
        self.entries = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.entries.append({"time": time.time(), "step": state.global_step, **(logs or {})})


def load(path, quantized):
    quant = None
    if quantized:
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg["quant_type"],
            bnb_4bit_compute_dtype=getattr(torch, cfg["compute_dtype"]),
            bnb_4bit_use_double_quant=cfg["double_quant"],
        )
    device_map = {"": 0} if cuda else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quant, device_map=device_map)
    if quantized:
        for module in model.modules():  # the same bitsandbytes CPU workaround the trainer applies
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora(stage):
    return LoraConfig(bias="none", task_type="CAUSAL_LM", **cfg[stage]["lora"])


def merge(base, adapter, target):
    merged = PeftModel.from_pretrained(load(base, False), adapter).merge_and_unload(safe_merge=True)
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)


def split(rows, n):
    """The first n rows are the eval split (None when n is 0)."""
    return (rows.select(range(n, len(rows))), rows.select(range(n))) if n else (rows, None)


def peak_memory():
    gib = 2**30
    return {"allocated": torch.cuda.max_memory_allocated() / gib, "reserved": torch.cuda.max_memory_reserved() / gib}


def train(trainer, stage):
    for param in trainer.model.parameters():  # fp32 adapter weights, as the seed trained them (TRL casts to bf16)
        if param.requires_grad:
            param.data = param.data.float()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if cuda:
        peaks[stage] = peak_memory()
    trainer.save_model(f"{out}/{stage}/adapter")


def buffer_shuffle(items, size, seed):
    """datasets' IterableDataset.shuffle(buffer_size=size) with a seed: how the seed recipe streamed its SFT rows."""
    rng = np.random.default_rng(seed)
    buffer, slots = [], iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = next(slots, None)
        if slot is None:
            slots = iter(rng.integers(0, size, size=1000).tolist())
            slot = next(slots)
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


def enough_tokens(texts, tokens):
    """Shuffled SFT texts until they fill the packed sequences max_steps consume (each adds its tokens and EOS)."""
    taken, count = [], 0
    for text in texts:
        if count >= tokens:
            break
        taken.append(text)
        count += len(tokenizer(text)["input_ids"]) + 1
    return taken


def short_prompts(batch):
    ids = tokenizer(batch["prompt"])["input_ids"]
    return [len(x) <= cfg["max_prompt_length"] for x in ids]


rows = load_dataset("json", data_files=cfg["data"], split="train")
sft_rows = rows.map(lambda r: {"text": cfg["text_template"].format(**r)}, remove_columns=rows.column_names)
sft_train, sft_eval = split(sft_rows, cfg["sft_eval_size"])
shuffled = buffer_shuffle(sft_train["text"], cfg["shuffle_buffer"], cfg["seed"])
sft_train = Dataset.from_dict({"text": enough_tokens(shuffled, cfg["sft_tokens_needed"])})
templates = {"prompt": cfg["prompt_template"], "chosen": cfg["chosen_template"], "rejected": cfg["rejected_template"]}
pairs = rows.map(lambda r: {k: t.format(**r) for k, t in templates.items()}, remove_columns=rows.column_names)
dpo_train, dpo_eval = split(pairs, cfg["dpo_eval_size"])
dpo_train = dpo_train.filter(short_prompts, batched=True)
dpo_train = dpo_train.select(range(min(cfg["dpo_pairs_needed"], len(dpo_train))))
dpo_eval = dpo_eval.filter(short_prompts, batched=True) if dpo_eval is not None else None
timelines = {"sft": Timeline(), "dpo": Timeline()}
peaks = {}

sft = SFTTrainer(
    model=load(cfg["model"], cfg["quantized"]),
    args=SFTConfig(output_dir=f"{out}/sft", **cfg["sft"]["args"], packing=cfg["packing"],
                   packing_strategy="wrapped", dataset_text_field="text"),
    train_dataset=sft_train,
    eval_dataset=sft_eval,
    processing_class=tokenizer,
    peft_config=lora("sft"),
    callbacks=[timelines["sft"]],
)
train(sft, "sft")
sft_history = sft.state.log_history
del sft
merge(cfg["model"], f"{out}/sft/adapter", f"{out}/sft_merge")

dpo = DPOTrainer(
    model=load(f"{out}/sft_merge", cfg["quantized"]),
    ref_model=None,
    args=DPOConfig(output_dir=f"{out}/dpo", **cfg["dpo"]["args"], **cfg["dpo_only"]),
    train_dataset=dpo_train,
    eval_dataset=dpo_eval,
    processing_class=tokenizer,
    peft_config=lora("dpo"),
    callbacks=[timelines["dpo"]],
)
train(dpo, "dpo")
dpo_history = dpo.state.log_history
del dpo
merge(f"{out}/sft_merge", f"{out}/dpo/adapter", f"{out}/model")
result = {
    "times": {"started": started, "imported": imported, "finished": time.time()},
    "sft_log_history": sft_history,
    "dpo_log_history": dpo_history,
    "timeline": {stage: t.entries for stage, t in timelines.items()},
    "peak_memory_gib": peaks,
    "bnb_library": str(getattr(getattr(bitsandbytes.cextension.lib, "_lib", None), "_name", None)),
}
Path(f"{out}/bare_result.json").write_text(json.dumps(result))
'''


def stage_args(spec: DPOJobSpec, stage: str, *, cuda: bool, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments of one stage as the spec sets them; mixed precision only on CUDA (as our trainer)."""
    s = getattr(spec, stage)
    precision = spec.quantization.compute_dtype if spec.quantization.mode == "4bit" else spec.model.dtype
    return {
        "max_steps": s.max_steps,
        "num_train_epochs": s.num_train_epochs,
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": s.lr_scheduler_type,
        "warmup_steps": s.warmup_steps,
        "per_device_train_batch_size": s.batch_size,
        "per_device_eval_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.gradient_accumulation_steps,
        "max_length": s.max_length,
        "optim": s.optimizer,
        "weight_decay": s.weight_decay,
        "activation_checkpointing": s.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if s.gradient_checkpointing else None,
        "logging_steps": s.logging_steps,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": s.eval_steps,
        "save_strategy": "steps",
        "save_steps": spec.checkpointing.save_steps,
        "save_total_limit": spec.checkpointing.save_total_limit,
        "report_to": "none",
        "seed": spec.seed,
        "data_seed": spec.seed,
        "use_cpu": not cuda,
        "bf16": cuda and precision == "bfloat16",
        "fp16": cuda and precision == "float16",
    }


def lora_kwargs(spec: DPOJobSpec, stage: str) -> dict[str, Any]:
    lora = getattr(spec, stage).lora
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": lora.target_modules}


def examples(spec: DPOJobSpec, stage: str) -> int:
    """Examples max_steps consume in one process: steps x batch x accumulation."""
    s = getattr(spec, stage)
    return s.max_steps * s.batch_size * s.gradient_accumulation_steps


def config(spec: DPOJobSpec, out: str, *, cuda: bool = False) -> dict[str, Any]:
    """Everything SCRIPT needs, from a spec that reads one set of local files for both stages, trains max_steps and
    packs SFT (our data stage then saves exactly the rows the steps consume: SCRIPT takes the same ones)."""
    data = spec.data
    assert data.sft is not None and data.dpo is not None and data.sft.source.files and data.dpo.source.files
    assert data.sft.source.files.paths == data.dpo.source.files.paths and data.dpo.eval_source is None
    assert spec.sft.max_steps > 0 and spec.dpo.max_steps > 0 and spec.sft.packing and data.max_samples is None
    return {
        "seed": spec.seed,
        "shuffle_buffer": SHUFFLE_BUFFER,
        "sft_tokens_needed": examples(spec, "sft") * spec.sft.max_length,
        "dpo_pairs_needed": examples(spec, "dpo"),
        "out": out,
        "model": spec.model.name,
        "dtype": spec.model.dtype,
        "quantized": spec.quantization.mode == "4bit",
        "quant_type": spec.quantization.quant_type,
        "compute_dtype": spec.quantization.compute_dtype,
        "double_quant": spec.quantization.double_quant,
        "data": data.sft.source.files.paths,
        "text_template": data.sft.text_template,
        "sft_eval_size": data.sft.eval_size,
        "prompt_template": data.dpo.prompt_template,
        "chosen_template": data.dpo.chosen_template,
        "rejected_template": data.dpo.rejected_template,
        "dpo_eval_size": data.dpo.eval_size,
        "max_prompt_length": spec.dpo.max_prompt_length,
        "packing": spec.sft.packing,
        "sft": {
            "args": stage_args(spec, "sft", cuda=cuda, has_eval=data.sft.eval_size > 0),
            "lora": lora_kwargs(spec, "sft"),
        },
        "dpo": {
            "args": stage_args(spec, "dpo", cuda=cuda, has_eval=data.dpo.eval_size > 0),
            "lora": lora_kwargs(spec, "dpo"),
        },
        "dpo_only": {
            "beta": spec.dpo.beta,
            "loss_type": list(spec.dpo.loss_type),
            "loss_weights": spec.dpo.loss_weights,
            "label_smoothing": spec.dpo.label_smoothing,
            "precompute_ref_log_probs": spec.dpo.precompute_ref_log_probs,
        },
    }
