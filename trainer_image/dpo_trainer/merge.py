"""The `sft_merge` and `dpo_merge` stages: fold a LoRA adapter into unquantized weights.

This is the fix for the seed's defect (TRL issue #926): the SFT adapter is merged into the base loaded
in model.dtype before DPO, and the DPO adapter is merged into that merged-SFT model, never into the
plain base. Merging into 4-bit weights would re-quantize, so both merges load in model.dtype.
Only the main process runs these stages (see pipeline.PipelineStage.main_only).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dpo_trainer.context import RunContext
from dpo_trainer.errors import TrainingError, reraise
from dpo_trainer.models import load_model, load_tokenizer
from dpo_trainer.training import dpo_input
from dpojob_api.vocabulary import Stage


def merge_adapter(ctx: RunContext, base: str, revision: str | None, adapter: Path, out: Path) -> None:
    """Load base in model.dtype, apply the adapter, merge_and_unload, save model + tokenizer to out."""
    from peft import PeftModel

    tokenizer = load_tokenizer(ctx.spec, base, revision, ctx.token)
    model = load_model(ctx.spec, base, revision=revision, token=ctx.token)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(safe_merge=True)
        merged.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except Exception as exc:
        reraise(exc, TrainingError, f"merging {adapter} into {base}")


def run_sft_merge(ctx: RunContext) -> None:
    spec = ctx.spec
    merge_adapter(ctx, spec.model.name, spec.model.revision, ctx.layout.adapter(Stage.SFT), ctx.layout.sft_model)


def run_dpo_merge(ctx: RunContext) -> None:
    """Merge the DPO adapter; DIR/model is what the card describes and the push uploads."""
    base, revision = dpo_input(ctx)
    merge_adapter(ctx, base, revision, ctx.layout.adapter(Stage.DPO), ctx.layout.model)
    target = ctx.spec.output.directory
    if target:
        try:
            shutil.copytree(ctx.layout.model, target, dirs_exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"output.directory: cannot copy the model to {target}: {exc}") from exc
