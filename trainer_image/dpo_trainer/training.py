"""The `sft` and `dpo` stages: QLoRA SFT on the base, then DPO with a fresh LoRA on the merged SFT model.

Both write Trainer checkpoints under their stage directory and resume from the newest complete one,
so a restarted pod loses at most `checkpointing.saveSteps` steps (or nothing, when SIGTERM leaves time
for the just-in-time checkpoint). Each stage saves its final adapter, the Trainer's log history (the model
card plots it) and how many processes trained with the resulting global batch (summary.json repeats it);
dpo_trainer.layout says where.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_trainer.context import RunContext
from dpo_trainer.data import load_split
from dpo_trainer.errors import DatasetError, Diverged, Interrupted, StoppedByRule, TrainingError, reraise
from dpo_trainer.layout import TrainingStage
from dpo_trainer.memory import as_metrics
from dpojob_api.vocabulary import Reason, Stage

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments
    from trl import DPOConfig, SFTConfig

    from dpojob_api.spec import DPOJobSpec


def latest_checkpoint(stage_dir: Path) -> str | None:
    """Newest complete checkpoint: trainer_state.json is written last, and an interrupted JIT save leaves a marker."""
    complete = [
        p
        for p in stage_dir.glob("checkpoint-*")
        if p.name.removeprefix("checkpoint-").isdigit()
        and (p / "trainer_state.json").exists()
        and not (p / "checkpoint-is-incomplete.txt").exists()
    ]
    return str(max(complete, key=lambda p: int(p.name.removeprefix("checkpoint-")))) if complete else None


def final_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The last training log (loss, rewards/*, ...) plus the last evaluation (eval_*) and the run's train_loss."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        if "loss" in entry:
            metrics.update({k: v for k, v in entry.items() if not k.startswith("eval_")})
        if any(k.startswith("eval_") for k in entry):
            metrics.update({k: v for k, v in entry.items() if k.startswith("eval_")})
        if "train_loss" in entry:
            metrics["train_loss"] = entry["train_loss"]
    metrics.pop("step", None)
    return metrics


def parallelism(args: TrainingArguments) -> dict[str, Any]:
    """How a stage trained: processes (one per GPU), collective backend, examples per optimizer step in all."""
    import torch.distributed as dist

    return {
        "worldSize": args.world_size,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "globalBatchSize": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    }


def train_and_save(ctx: RunContext, stage: TrainingStage, trainer: Trainer) -> None:
    """Train (resuming when a checkpoint exists) with fp32 adapter weights, evaluate once more if the last step
    missed an eval, save. A `fail` stop rule ends the run here (its checkpoint saved); a `finish` rule's early stop
    is saved like a finished stage."""
    from dpo_trainer.callbacks import stop_rules
    from dpo_trainer.models import trainable_in_fp32

    assert trainer.model is not None  # every Trainer here is built with its model
    trainable_in_fp32(trainer.model)
    checkpoint = latest_checkpoint(ctx.layout.stage_dir(stage))
    trainer.train(resume_from_checkpoint=checkpoint)
    state = trainer.state
    rules = stop_rules(trainer.callback_handler.callbacks)
    stop = rules.stop if rules is not None else None
    if stop is not None and stop.action == "fail":
        ctx.write_json(ctx.layout.log_history(stage), state.log_history)
        raise (Diverged if stop.reason == Reason.DIVERGED else StoppedByRule)(stop.message)
    if state.global_step < state.max_steps and stop is None:
        raise Interrupted(
            f"{stage} stopped at step {state.global_step} of {state.max_steps} after SIGTERM; "
            "the checkpoint is saved and a rerun resumes from it"
        )
    evaluated_at = [e.get("step") for e in state.log_history if "eval_loss" in e]
    if trainer.eval_dataset is not None and (not evaluated_at or evaluated_at[-1] != state.global_step):
        trainer.evaluate()
    trainer.save_model(str(ctx.layout.adapter(stage)))
    ctx.write_json(ctx.layout.log_history(stage), state.log_history)
    ctx.write_json(ctx.layout.parallelism(stage), parallelism(trainer.args))


def sft_config(spec: DPOJobSpec, output_dir: str, has_eval: bool) -> SFTConfig:
    """The spec's SFT stage as TRL settings."""
    from trl import SFTConfig

    from dpo_trainer.models import trainer_arguments

    return SFTConfig(
        **trainer_arguments(spec, spec.sft, output_dir, has_eval),
        packing=spec.sft.packing,
        # "wrapped" concatenates and cuts like the seed's ConstantLengthDataset; "bfd" needs flash-attention.
        packing_strategy="wrapped",
        dataset_text_field="text",
    )


def dpo_config(spec: DPOJobSpec, output_dir: str, has_eval: bool) -> DPOConfig:
    """The spec's DPO stage as TRL settings."""
    from trl import DPOConfig

    from dpo_trainer.models import trainer_arguments

    return DPOConfig(
        **trainer_arguments(spec, spec.dpo, output_dir, has_eval),
        beta=spec.dpo.beta,
        loss_type=list(spec.dpo.loss_type),
        loss_weights=spec.dpo.loss_weights,
        label_smoothing=spec.dpo.label_smoothing,
        precompute_ref_log_probs=spec.dpo.precompute_ref_log_probs,
    )


def _stage_inputs(ctx: RunContext, stage: TrainingStage, model_path: str, revision: str | None, missing: str) -> tuple:
    """What a training stage starts from: its train/eval splits, the tokenizer and the (quantized) model."""
    from dpo_trainer.models import load_model, load_tokenizer

    spec = ctx.spec
    train = load_split(ctx, stage, "train")
    if train is None:
        raise DatasetError(missing)
    evaluation = load_split(ctx, stage, "eval")
    tokenizer = load_tokenizer(spec, model_path, revision, ctx.token)
    model = load_model(spec, model_path, revision=revision, token=ctx.token, training=True)
    return train, evaluation, tokenizer, model


def run_sft(ctx: RunContext) -> None:
    """QLoRA SFT of the base model on the rendered `text` column."""
    from trl import SFTTrainer

    from dpo_trainer.callbacks import callbacks
    from dpo_trainer.models import lora_config

    spec = ctx.spec
    train, evaluation, tokenizer, model = _stage_inputs(
        ctx, Stage.SFT, spec.model.name, spec.model.revision, "the data stage produced no SFT rows"
    )
    try:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(spec, str(ctx.layout.stage_dir(Stage.SFT)), evaluation is not None),
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=lora_config(spec.sft.lora),
            callbacks=callbacks(ctx, Stage.SFT),
        )
        train_and_save(ctx, Stage.SFT, trainer)
    except Exception as exc:
        reraise(exc, TrainingError, Stage.SFT)


def dpo_input(ctx: RunContext) -> tuple[str, str | None]:
    """DPO starts from the merged SFT model, or from the base when SFT is disabled."""
    if ctx.spec.sft.enabled:
        return str(ctx.sft_model or ctx.layout.sft_model), None
    return ctx.spec.model.name, ctx.spec.model.revision


def run_dpo(ctx: RunContext) -> None:
    """DPO with a fresh LoRA; the reference is the same model with the adapter disabled (no second copy)."""
    from trl import DPOTrainer

    from dpo_trainer.callbacks import callbacks
    from dpo_trainer.models import lora_config

    spec = ctx.spec
    path, revision = dpo_input(ctx)
    train, evaluation, tokenizer, model = _stage_inputs(
        ctx, Stage.DPO, path, revision, "the data stage produced no DPO pairs"
    )
    try:
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=dpo_config(spec, str(ctx.layout.stage_dir(Stage.DPO)), evaluation is not None),
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            peft_config=lora_config(spec.dpo.lora),
            callbacks=callbacks(ctx, Stage.DPO),
        )
        train_and_save(ctx, Stage.DPO, trainer)
    except Exception as exc:
        reraise(exc, TrainingError, Stage.DPO)


def stage_metrics(ctx: RunContext, stage: TrainingStage) -> dict[str, float]:
    """The stage's final metrics, with its GPU memory (gpu/*) when it ran on CUDA."""
    history = ctx.read_json(ctx.layout.log_history(stage)) or []
    return final_metrics(history) | as_metrics(ctx.state.stages.get(stage, {}).get("gpu"))
