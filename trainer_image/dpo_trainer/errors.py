"""Failure reasons, their exit codes, and turning any exception into one clear, token-free line.

The operator reads the reason from the container's termination message and the exit code from the
pod status, so both are part of the trainer's contract (the reasons are dpojob_api.progress.Reason):

    =================  =========  ============================================================================
    reason             exit code  meaning
    =================  =========  ============================================================================
    Succeeded          0          the merged model is saved (and pushed when output.hub is set)
    InvalidSpec        2          the DPOJob file is unreadable or fails validation
    DatasetError       3          a dataset is missing, unreadable, lacks a column, or ends empty
    ModelLoadError     4          the base model or tokenizer cannot be loaded
    HubAuthError       5          the Hub refused the token (401/403, gated repo, no token for a push)
    HubError           6          any other Hub failure (repo not found, server error, network)
    OutOfMemory        7          host or accelerator memory ran out
    TrainingError      8          anything else that failed while training, merging or writing
    QualityGateFailed  9          a quality gate (output.gates) failed: nothing pushed, the merged model kept
    GPUUnavailable     10         runtime.gpus > 0 but torch cannot use CUDA: failed before loading anything
    Interrupted        143        SIGTERM/SIGINT: a checkpoint was saved when possible; rerun resumes
    =================  =========  ============================================================================
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import ClassVar, NoReturn

from dpojob_api.progress import Reason

MAX_MESSAGE_CHARS = 1000
_HF_TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{20,}")


class TrainerError(Exception):
    """A failure with a reason code the operator understands; str() is one human-readable line."""

    reason: ClassVar[Reason] = "TrainingError"
    exit_code: ClassVar[int] = 8

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(TrainerError):
    reason = "InvalidSpec"
    exit_code = 2


class DatasetError(TrainerError):
    reason = "DatasetError"
    exit_code = 3


class ModelLoadError(TrainerError):
    reason = "ModelLoadError"
    exit_code = 4


class HubAuthError(TrainerError):
    reason = "HubAuthError"
    exit_code = 5


class HubError(TrainerError):
    reason = "HubError"
    exit_code = 6


class OutOfMemory(TrainerError):
    reason = "OutOfMemory"
    exit_code = 7


class TrainingError(TrainerError):
    reason = "TrainingError"
    exit_code = 8


class QualityGateFailed(TrainerError):
    reason = "QualityGateFailed"
    exit_code = 9


class GPUUnavailable(TrainerError):
    reason = "GPUUnavailable"
    exit_code = 10


class Interrupted(TrainerError):
    reason = "Interrupted"
    exit_code = 143


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
    Interrupted,
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
        return OutOfMemory(f"{prefix}{detail}")
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
