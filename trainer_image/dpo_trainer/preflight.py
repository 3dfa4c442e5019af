"""Before any download or GPU time: will the model fit? Reads only the base model's config.json, counts its
parameters on the meta device (no memory), and estimates each training stage's peak GPU memory:

    weights      4-bit: the blocks' linear layers at 4 bits (+ quantization constants), the rest (embeddings,
                 norms, lm_head) in the compute dtype; `quantization.mode: none`: every parameter in model.dtype
    adapter      LoRA parameters (r x (in + out) per targeted linear layer) in fp32, their gradients and the
                 optimizer's states (two fp32 moments; one byte each for the 8-bit optimizers; none for SGD)
    activations  per layer and token, what autograd keeps for the backward pass in 16-bit: 32 x hidden bytes
                 (attention through PyTorch's SDPA, no score matrix) plus 8 bytes per input feature of each
                 LoRA-targeted linear layer (its dropped-out input, the mask, LoRA's own intermediates), measured
                 with saved_tensors_hooks on Llama-shaped models (tests/trainer/test_preflight.py); with gradient
                 checkpointing only each layer's input (2 x hidden) plus one layer recomputed
    logits       tokens x vocabulary x 10 bytes: 16-bit logits, their fp32 upcast for the loss and its gradient
    overhead     the CUDA context and allocator slack: 10 % plus 0.5 GiB

SFT trains batchSize sequences of maxLength tokens; DPO twice as many rows (chosen and rejected side by side;
the reference pass runs under no_grad before the policy's and does not add to the peak). An estimate above the
memory of the GPU the pod sees fails the run at once (InsufficientGPUMemory), naming the stage, the parts and
what to change; DPO_GPU_MEMORY (bytes, or e.g. "16Gi") stands in for the GPU's memory (tests, or to plan).

Before that, `check_writable`: the work directory and output.directory are created and a probe file written and
removed in each, so a read-only filesystem or volume fails the run at once (OutputNotWritable) instead of after
the training. The Hub's side of the preflight (sources readable, the target writable, the run's tag free) is in
dpo_trainer.hub.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpo_trainer.errors import InsufficientGPUMemory, InvalidSpec, ModelLoadError, OutputNotWritable, classify
from dpo_trainer.specfile import looks_like_path
from dpojob_api.spec import DPOJobSpec, TrainingSpec
from dpojob_api.vocabulary import Stage, TrainingStage

GIB = 1 << 30
GPU_MEMORY_ENV = "DPO_GPU_MEMORY"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZER_STATE_BYTES = {
    "paged_adamw_32bit": 8,
    "adamw_torch": 8,
    "paged_adamw_8bit": 2,
    "adamw_8bit": 2,
    "sgd": 0,
    "adafactor": 4,
}
"""Bytes of optimizer state per trainable parameter."""
ACTIVATION_BYTES_PER_HIDDEN = 32
LORA_INPUT_BYTES = 8
"""Activation bytes per layer and token: per hidden unit, and per input feature of a LoRA-targeted linear layer."""
LOGIT_BYTES = 10
OVERHEAD_FRACTION = 0.10
OVERHEAD_BYTES = GIB // 2


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of the model, counted on the meta device."""

    linear_params: int
    """Parameters of the transformer blocks' linear layers (what 4-bit quantizes)."""
    other_params: int
    hidden_size: int
    layers: int
    vocab_size: int
    lora_params: dict[str, int]
    """LoRA parameters per stage (its target modules and rank)."""
    lora_inputs: dict[str, int]
    """Per stage: input features of one layer's LoRA-targeted linear layers (what their activations scale with)."""


@dataclass(frozen=True)
class StageEstimate:
    weights: int
    adapter: int
    activations: int
    logits: int

    @property
    def peak(self) -> int:
        parts = self.weights + self.adapter + self.activations + self.logits
        return int(parts * (1 + OVERHEAD_FRACTION)) + OVERHEAD_BYTES

    def describe(self) -> str:
        parts = ("weights", "adapter", "activations", "logits")
        return ", ".join(f"{name} {getattr(self, name) / GIB:.1f}" for name in parts)


def check_writable(spec: DPOJobSpec, work_dir: Path) -> None:
    """Create the work directory and output.directory and write (then remove) a probe file in each."""
    targets = [(work_dir, "the work directory (--output; in a cluster under spec.checkpointing.directory)")]
    if spec.output.directory:
        targets.append((Path(spec.output.directory), "spec.output.directory"))
    for path, what in targets:
        probe = path / f".dpo-trainer-probe-{os.getpid()}"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputNotWritable(
                f"{what} {str(path)!r} is not writable ({exc.strerror or exc}): nothing was downloaded or trained; "
                "give a path on a writable volume (spec.runtime.outputVolume mounted at /output, not readOnly; the "
                "checkpoint volume at spec.checkpointing.directory)"
            ) from exc


def read_config(spec: DPOJobSpec, token: str | None) -> dict[str, Any]:
    """The base model's config.json alone (a local directory's, or one small download from the Hub)."""
    try:
        if looks_like_path(spec.model.name):
            path = Path(spec.model.name) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(spec.model.name, "config.json", revision=spec.model.revision, token=token))
        return json.loads(path.read_text())
    except Exception as exc:
        raise classify(exc, ModelLoadError, f"reading {spec.model.name}'s config.json") from exc


def model_shape(spec: DPOJobSpec, config: dict[str, Any]) -> ModelShape:
    """Counts from a model built on the meta device (no weights allocated), by transformers itself."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.for_model(**config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=spec.model.trust_remote_code)
    linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    head = model.get_output_embeddings()
    in_blocks = {name: m for name, m in linear.items() if m is not head}
    linear_params = sum(m.weight.numel() for m in in_blocks.values())
    total = sum(p.numel() for p in model.parameters())
    text = model_config.get_text_config()
    lora, lora_inputs = {}, {}
    for stage, section in ((Stage.SFT, spec.sft), (Stage.DPO, spec.dpo)):
        targets = tuple(section.lora.target_modules)
        targeted = [m for name, m in in_blocks.items() if name.split(".")[-1] in targets]
        lora[stage.value] = sum(section.lora.r * (m.in_features + m.out_features) for m in targeted)
        lora_inputs[stage.value] = sum(m.in_features for m in targeted) // max(text.num_hidden_layers, 1)
    return ModelShape(
        linear_params=linear_params,
        other_params=total - linear_params,
        hidden_size=text.hidden_size,
        layers=text.num_hidden_layers,
        vocab_size=text.vocab_size,
        lora_params=lora,
        lora_inputs=lora_inputs,
    )


def estimate(spec: DPOJobSpec, shape: ModelShape, stage: TrainingStage) -> StageEstimate:
    """One training stage's peak GPU memory, by part (see the module docstring)."""
    section: TrainingSpec = spec.sft if stage == Stage.SFT else spec.dpo
    if spec.quantization.mode == "4bit":
        compute = DTYPE_BYTES[spec.quantization.compute_dtype]
        weights = int(shape.linear_params * (0.5 + 1 / 64)) + shape.other_params * compute
    else:
        weights = (shape.linear_params + shape.other_params) * DTYPE_BYTES[spec.model.dtype]
    adapter = shape.lora_params[stage.value] * (8 + OPTIMIZER_STATE_BYTES.get(section.optimizer, 8))
    rows = section.batch_size * (2 if stage == Stage.DPO else 1)
    tokens = rows * section.max_length
    per_token = ACTIVATION_BYTES_PER_HIDDEN * shape.hidden_size + LORA_INPUT_BYTES * shape.lora_inputs[stage.value]
    per_layer = per_token * tokens
    if section.gradient_checkpointing:
        activations = 2 * shape.hidden_size * tokens * shape.layers + per_layer
    else:
        activations = per_layer * shape.layers
    return StageEstimate(weights, adapter, activations, tokens * shape.vocab_size * LOGIT_BYTES)


_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": GIB}
_UNITS["Ti"] = 1 << 40


def parse_bytes(text: str) -> int:
    """Bytes from "17179869184", "16Gi" or "80G" (Kubernetes quantity suffixes)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?)?\s*", text)
    if match is None:
        raise InvalidSpec(f"{GPU_MEMORY_ENV}={text!r}: give bytes or a quantity such as 16Gi")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def gpu_memory(spec: DPOJobSpec) -> int | None:
    """The memory of the GPU each process trains on: DPO_GPU_MEMORY when set, else CUDA's, else None (CPU)."""
    configured = os.environ.get(GPU_MEMORY_ENV)
    if configured:
        return parse_bytes(configured)
    from dpo_trainer.models import cuda_available, uses_cuda

    if not uses_cuda(spec) or not cuda_available():
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def check(spec: DPOJobSpec, token: str | None) -> dict[str, Any]:
    """Estimate every enabled training stage; fail now when one clearly cannot fit. Returns what status shows."""
    shape = model_shape(spec, read_config(spec, token))
    stages: list[TrainingStage] = [Stage.SFT, Stage.DPO] if spec.sft.enabled else [Stage.DPO]
    estimates = {stage: estimate(spec, shape, stage) for stage in stages}
    available = gpu_memory(spec)
    for stage, found in estimates.items():
        if available is not None and found.peak > available:
            section = spec.sft if stage == Stage.SFT else spec.dpo
            knobs = [
                f"lower {stage}.batchSize ({section.batch_size}; raise gradientAccumulationSteps to keep the "
                f"effective batch)",
                f"lower {stage}.maxLength ({section.max_length})",
            ]
            if not section.gradient_checkpointing:
                knobs.insert(1, f"set {stage}.gradientCheckpointing: true")
            if spec.quantization.mode != "4bit":
                knobs.append("quantization.mode: 4bit")
            raise InsufficientGPUMemory(
                f"{stage} needs about {found.peak / GIB:.1f} GiB of GPU memory (GiB: {found.describe()}, plus "
                f"overhead) but the GPU has {available / GIB:.1f} GiB: " + ", ".join(knobs) + ", or use a larger GPU"
            )
    result: dict[str, Any] = {"stages": {stage.value: round(e.peak / GIB, 2) for stage, e in estimates.items()}}
    if available is not None:
        result["gpuMemoryGiB"] = round(available / GIB, 2)
    return result
