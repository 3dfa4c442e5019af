"""Failure reasons, their exit codes, and turning any exception into one clear, token-free line.

The operator reads the reason from the container's termination message and the exit code from the
pod status, so both are part of the trainer's contract: dpojob_api.vocabulary.REASONS lists every reason
with its exit code, whether the operator retries it, and what it means.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import ClassVar, NoReturn

from dpojob_api.vocabulary import EXIT_CODES, Reason

MAX_MESSAGE_CHARS = 1000
_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")


class TrainerError(Exception):
    """A failure with a reason code the operator understands; str() is one human-readable line."""

    reason: ClassVar[Reason] = Reason.TRAINING_ERROR
    exit_code: ClassVar[int] = EXIT_CODES[Reason.TRAINING_ERROR]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls.exit_code = EXIT_CODES[cls.reason]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(TrainerError):
    reason = Reason.INVALID_SPEC


class DatasetError(TrainerError):
    reason = Reason.DATASET_ERROR


class ModelLoadError(TrainerError):
    reason = Reason.MODEL_LOAD_ERROR


class HubAuthError(TrainerError):
    reason = Reason.HUB_AUTH_ERROR


class HubError(TrainerError):
    reason = Reason.HUB_ERROR


class OutOfMemory(TrainerError):
    reason = Reason.OUT_OF_MEMORY


class TrainingError(TrainerError):
    reason = Reason.TRAINING_ERROR


class GPUOutOfMemory(TrainerError):
    reason = Reason.GPU_OUT_OF_MEMORY


class QualityGateFailed(TrainerError):
    reason = Reason.QUALITY_GATE_FAILED


class GPUUnavailable(TrainerError):
    reason = Reason.GPU_UNAVAILABLE


class Interrupted(TrainerError):
    reason = Reason.INTERRUPTED


class InsufficientGPUMemory(TrainerError):
    reason = Reason.INSUFFICIENT_GPU_MEMORY


class StoppedByRule(TrainerError):
    reason = Reason.STOPPED_BY_RULE


class Diverged(TrainerError):
    reason = Reason.DIVERGED


class HubWriteDenied(TrainerError):
    reason = Reason.HUB_WRITE_DENIED


class RunRevisionTaken(TrainerError):
    reason = Reason.RUN_REVISION_TAKEN


class OutputNotWritable(TrainerError):
    reason = Reason.OUTPUT_NOT_WRITABLE


class HubReadDenied(TrainerError):
    reason = Reason.HUB_READ_DENIED


ALL_ERRORS: tuple[type[TrainerError], ...] = (
    InvalidSpec,
    DatasetError,
    ModelLoadError,
    HubAuthError,
    HubError,
    OutOfMemory,
    TrainingError,
    QualityGateFailed,
    GPUUnavailable,
    GPUOutOfMemory,
    Interrupted,
    StoppedByRule,
    Diverged,
    InsufficientGPUMemory,
    HubWriteDenied,
    RunRevisionTaken,
    OutputNotWritable,
    HubReadDenied,
)


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove secret values (and anything shaped like a Hub token) from text meant for logs."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return _HF_TOKEN_PATTERN.sub("hf_***", text)


def one_line(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Collapse whitespace so a message fits one log line and a termination message."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes: transformers and datasets wrap Hub errors in OSError/ValueError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def out_of_memory_advice(chain: list[BaseException]) -> str:
    """What ran out and the knobs that fit the run in memory (the stage is the caller's context)."""
    if any(isinstance(e, MemoryError) for e in chain):
        return "host memory ran out: raise spec.runtime.memory, or lower spec.runtime.cpu (fewer data workers)"
    return (
        f"GPU memory ran out{_cuda_memory()}: lower the stage's batchSize (raise gradientAccumulationSteps to keep "
        "the effective batch), set gradientCheckpointing: true, lower maxLength (and dpo.maxPromptLength), keep "
        "quantization.mode: 4bit, or use a GPU with more memory"
    )


def _cuda_memory() -> str:
    """ " on GPU 0 (79.2 GiB: 77.9 GiB allocated by PyTorch, 78.5 GiB reserved)" when torch and CUDA are loaded."""
    torch = sys.modules.get("torch")
    try:
        if torch is None or not torch.cuda.is_available():
            return ""
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    except Exception:  # advice only: never let it hide the error it explains
        return ""
    gib = 1 << 30
    return (
        f" on GPU {device} ({total / gib:.1f} GiB: {allocated / gib:.1f} GiB allocated by PyTorch, "
        f"{reserved / gib:.1f} GiB reserved)"
    )


def _is_hub_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("huggingface_hub") or _http_status(exc) is not None


def classify(exc: BaseException, default: type[TrainerError] = TrainingError, context: str = "") -> TrainerError:
    """Map an exception to a TrainerError: OOM and Hub auth win over the caller's default reason.

    `context` (e.g. "loading model x") prefixes the message so the line says what was being done.
    """
    if isinstance(exc, TrainerError):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(str(exc) or "interrupted; rerun with the same output directory to resume")
    chain = list(_chain(exc))
    prefix = f"{context}: " if context else ""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if any(_is_out_of_memory(e) for e in chain):
        error = OutOfMemory if any(isinstance(e, MemoryError) for e in chain) else GPUOutOfMemory
        return error(f"{prefix}{out_of_memory_advice(chain)}: {detail}")
    for e in chain:
        name, status = type(e).__name__, _http_status(e)
        if name == "RepositoryNotFoundError":
            # Missing, or private and no/other token: the Hub answers both alike; the caller's reason fits best.
            return default(f"{prefix}repository not found (or private: check HF_TOKEN): {detail}")
        if name == "GatedRepoError" or status in (401, 403):
            code = f" (HTTP {status})" if status else ""
            return HubAuthError(f"{prefix}the Hub refused access{code}: {detail}")
    if default is TrainingError and any(_is_hub_error(e) for e in chain):
        return HubError(f"{prefix}{detail}")
    return default(f"{prefix}{detail}")


def reraise(exc: BaseException, default: type[TrainerError] = TrainingError, context: str = "") -> NoReturn:
    """Raise classify(...) chained to the library error (kept for DIR/debug.log); TrainerErrors pass through."""
    error = classify(exc, default, context)
    if error is exc:
        raise error
    raise error from exc
