"""Loading models and tokenizers, and mapping the spec onto PEFT / bitsandbytes / Trainer settings.

One place decides device and precision. The device is the spec's: CUDA when runtime.gpus > 0, and a run that
asked for GPUs torch cannot use fails before loading anything (check_device: GPUUnavailable) rather than
training a 7B model on CPU for days; CPU only with runtime.gpus: 0 (even where a GPU is visible: a pod
that requested none must not use one). Precision: see select_precision. Trainable (LoRA) weights are kept
in fp32 whatever the compute dtype, as in the seed: TRL 1.16 casts them to bf16 for quantized models, where
small updates round away and fp16's gradient scaler refuses half-precision gradients.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dpo_trainer.errors import GPUUnavailable, ModelLoadError, reraise
from dpojob_api.spec import DPOJobSpec, DType, LoRASpec, TrainingSpec

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

VISIBILITY_ENV = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
"""What decides which GPUs a process sees: CUDA's own mask, and the one the NVIDIA container runtime reads."""
DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}
"""The oldest NVIDIA driver (major version) each CUDA major release runs on (NVIDIA's compatibility table)."""
IMAGE_CUDA = "13.0"
"""The CUDA release the trainer image's torch is built for (trainer_image/Dockerfile)."""
_DRIVER_VERSION = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)")


@cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@cache
def bf16_supported() -> bool:
    """Native bf16 (compute capability 8.0+, Ampere on); torch's default also counts slow emulation on older GPUs."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


def uses_cuda(spec: DPOJobSpec) -> bool:
    """The spec decides the device; check_device has made sure CUDA works when it asks for GPUs."""
    return spec.runtime.gpus > 0


@dataclass(frozen=True)
class CudaProbe:
    """What can be read cheaply about a machine where torch sees no usable GPU."""

    torch_version: str
    torch_cuda: str | None
    """torch.version.cuda: the CUDA release torch was built for; None for a CPU-only build."""
    driver: str | None
    """The NVIDIA driver's version, when readable."""
    devices: int
    """CUDA devices torch can see."""
    visible: dict[str, str]
    """The VISIBILITY_ENV variables that are set."""


def nvidia_driver_version(proc_file: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The loaded kernel module's version (the NVIDIA container runtime exposes the file), else nvidia-smi's."""
    try:
        match = _DRIVER_VERSION.search(proc_file.read_text())
    except OSError:
        match = None
    if match:
        return match.group(1)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return next(iter(done.stdout.split()), None)


def probe_cuda() -> CudaProbe:
    import torch

    return CudaProbe(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        driver=nvidia_driver_version(),
        devices=torch.cuda.device_count(),
        visible={name: os.environ[name] for name in VISIBILITY_ENV if name in os.environ},
    )


def driver_needed(cuda: str) -> str:
    minimum = DRIVER_FOR_CUDA.get(int(cuda.split(".")[0]))
    driver = f"an NVIDIA driver >= {minimum}" if minimum else f"an NVIDIA driver supporting CUDA {cuda}"
    return driver + " on the node"


def gpu_unavailable_message(gpus: int, probe: CudaProbe) -> str:
    """One line: what torch and the machine say, and the ways out."""
    if probe.torch_cuda is None:
        build = f"torch {probe.torch_version} is a CPU-only build"
        needs = f"a CUDA build of torch, as in the trainer image (CUDA {IMAGE_CUDA}, {driver_needed(IMAGE_CUDA)})"
    else:
        build = f"torch {probe.torch_version} is built for CUDA {probe.torch_cuda}"
        needs = driver_needed(probe.torch_cuda)
    driver = f"NVIDIA driver {probe.driver}" if probe.driver else "no NVIDIA driver found"
    visible = ", ".join(f"{k}={v!r}" for k, v in probe.visible.items()) or " and ".join(VISIBILITY_ENV) + " unset"
    return (
        f"spec.runtime.gpus is {gpus} but torch cannot use CUDA: {build}; {driver}; {probe.devices} CUDA devices "
        f"visible; {visible}. To use the GPU: {needs}, and the NVIDIA device plugin giving the pod nvidia.com/gpu; "
        "or set spec.runtime.gpus: 0 to train on CPU"
    )


@dataclass(frozen=True)
class Precision:
    """How the training stages compute: the Trainer's mixed-precision mode and the dtypes their models load in."""

    mixed: Literal["bf16", "fp16"] | None
    compute_dtype: DType
    """Dtype of the 4-bit layers' matmuls (bnb_4bit_compute_dtype)."""
    model_dtype: DType
    """Dtype the training stages load the frozen base in (the merges keep model.dtype)."""
    note: str | None = None
    """Why this departs from the spec, as a warning line."""


def select_precision(spec: DPOJobSpec, cuda: bool, bf16: bool) -> Precision:
    """Mixed precision follows the dtype training computes in (quantization.computeDtype on the 4-bit path,
    model.dtype otherwise), on CUDA only: CPU runs in the loaded dtypes as they are. A GPU without native bf16
    (before Ampere: T4, V100) trains in fp16 instead, with a warning: the seed's recipe still runs there (fp32
    adapters make fp16's loss scaling work), and the merges keep model.dtype, so the saved model is what the
    spec asked for."""

    def available(dtype: DType) -> DType:
        return "float16" if dtype == "bfloat16" and cuda and not bf16 else dtype

    asked = (spec.model.dtype, spec.quantization.compute_dtype)
    model_dtype, compute_dtype = available(asked[0]), available(asked[1])
    note = None
    if (model_dtype, compute_dtype) != asked:
        note = "this GPU has no native bfloat16 (compute capability < 8.0): float16 where the spec says bfloat16"
    computes_in = compute_dtype if spec.quantization.mode == "4bit" else model_dtype
    trainer_flags: dict[str, Literal["bf16", "fp16"]] = {"bfloat16": "bf16", "float16": "fp16"}
    mixed = trainer_flags.get(computes_in) if cuda else None
    return Precision(mixed, compute_dtype, model_dtype, note)


def precision(spec: DPOJobSpec) -> Precision:
    cuda = uses_cuda(spec)
    return select_precision(spec, cuda, cuda and bf16_supported())


def check_device(spec: DPOJobSpec) -> None:
    """Fail at once when the spec asks for GPUs torch cannot use; warn (stderr) when the GPU changes the precision."""
    if not uses_cuda(spec):
        return
    if not cuda_available():
        raise GPUUnavailable(gpu_unavailable_message(spec.runtime.gpus, probe_cuda()))
    note = precision(spec).note
    if note:
        print(f"dpo-trainer: warning: {note}", file=sys.stderr, flush=True)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def device_map(spec: DPOJobSpec) -> dict[str, int] | None:
    """Each rank keeps its whole (quantized) model on its own GPU; CPU needs no map."""
    if not uses_cuda(spec):
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
        bnb_4bit_compute_dtype=torch_dtype(precision(spec).compute_dtype),
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
    training: bool = False,
) -> PreTrainedModel:
    """Load a causal LM: for a training stage in the training precision, 4-bit (QLoRA-ready) when the spec
    quantizes; otherwise (the merges) in model.dtype."""
    from transformers import AutoModelForCausalLM

    quant = quantization_config(spec) if training else None
    dtype = precision(spec).model_dtype if training else spec.model.dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            revision=revision,
            dtype=torch_dtype(dtype),
            quantization_config=quant,
            device_map=device_map(spec),
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


def trainable_in_fp32(model: torch.nn.Module) -> None:
    """Undo TRL's bf16 cast of a quantized model's adapter weights (call before training creates the optimizer)."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def keep_4bit_weights_trainable_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes 0.50 from repacking 4-bit weights for its CPU inference kernel during evaluation.

    On CPUs with AVX512-BF16, the first eval-mode forward converts every Linear4bit to a layout served by
    `gemv_4bit`, which has no backward: all later training steps silently get no gradient through the
    frozen layers, so most LoRA adapters stop learning. The flag below is what gates that conversion.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (a bitsandbytes attribute)


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
    mixed = precision(spec).mixed
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
        "use_cpu": not uses_cuda(spec),
        "bf16": mixed == "bf16",
        "fp16": mixed == "fp16",
        "disable_tqdm": False,
        "enable_jit_checkpoint": True,
        "ddp_find_unused_parameters": False,
    }
