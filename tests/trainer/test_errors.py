"""Reason classification and secret scrubbing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dpo_trainer.errors import (
    ALL_ERRORS,
    DatasetError,
    GPUOutOfMemory,
    HubAuthError,
    HubError,
    Interrupted,
    ModelLoadError,
    OutOfMemory,
    TrainingError,
    classify,
    one_line,
    reraise,
    scrub,
)
from dpojob_api.vocabulary import TRAINER_REASONS, Reason


class FakeHTTPError(Exception):
    """Shaped like huggingface_hub's HfHubHTTPError: a `response` with a status code."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{status} Client Error")
        self.response = SimpleNamespace(status_code=status)


class RepositoryNotFoundError(FakeHTTPError):
    pass


class GatedRepoError(FakeHTTPError):
    pass


def _wrapped(inner: BaseException, outer: type[Exception] = OSError) -> Exception:
    """How transformers reports Hub errors: its own exception raised `from` the Hub's."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer("could not load") from e
    except Exception as e:
        return e


def test_scrub_removes_the_token_value_and_hub_shaped_tokens() -> None:
    text = "token=s3cr3t-value url=https://x/?t=s3cr3t-value other=hf_abcdefghijklmnopqrstuvwxyz"
    assert scrub(text, ["s3cr3t-value", None, ""]) == "token=*** url=https://x/?t=*** other=hf_***"
    assert scrub("abc", ["abc"]) == "abc"  # too short to be a secret: never blank out ordinary words


def test_one_line_flattens_and_caps() -> None:
    assert one_line("a\n  b\tc\n") == "a b c"
    long = one_line("x" * 5000, limit=100)
    assert len(long) == 100 and long.endswith("...")


@pytest.mark.parametrize(
    ("exc", "default", "expected"),
    [
        (MemoryError(), TrainingError, OutOfMemory),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), TrainingError, GPUOutOfMemory),
        (_wrapped(MemoryError(), RuntimeError), DatasetError, OutOfMemory),
        (_wrapped(FakeHTTPError(401)), ModelLoadError, HubAuthError),
        (_wrapped(FakeHTTPError(403)), DatasetError, HubAuthError),
        (_wrapped(GatedRepoError(403)), ModelLoadError, HubAuthError),
        (_wrapped(RepositoryNotFoundError(401)), ModelLoadError, ModelLoadError),
        (RepositoryNotFoundError(404), TrainingError, TrainingError),
        (FakeHTTPError(500), TrainingError, HubError),
        (FakeHTTPError(500), DatasetError, DatasetError),
        (ValueError("bad"), ModelLoadError, ModelLoadError),
        (KeyboardInterrupt(), TrainingError, Interrupted),
    ],
)
def test_classify(exc: BaseException, default: type, expected: type) -> None:
    assert type(classify(exc, default)) is expected


def test_classify_keeps_trainer_errors_and_prefixes_context() -> None:
    original = DatasetError("no rows")
    assert classify(original, ModelLoadError) is original
    error = classify(ValueError("boom"), TrainingError, "dpo")
    assert error.message == "dpo: ValueError: boom"
    assert "not found" in classify(RepositoryNotFoundError(401), DatasetError, "x").message


def test_reraise_chains_library_errors_but_not_trainer_errors() -> None:
    with pytest.raises(ModelLoadError) as wrapped:
        try:
            raise ValueError("bad config")
        except ValueError as exc:
            reraise(exc, ModelLoadError, "loading model m")
    assert isinstance(wrapped.value.__cause__, ValueError)
    original = DatasetError("no rows")
    with pytest.raises(DatasetError) as passed:
        reraise(original, TrainingError)
    assert passed.value is original and passed.value.__cause__ is None


def test_the_error_reasons_are_the_shared_contract() -> None:
    """Every reason the trainer reports is one the operator knows, and every failure the operator knows exists."""
    assert sorted(error.reason for error in ALL_ERRORS) == sorted(set(TRAINER_REASONS) - {Reason.SUCCEEDED})


def test_out_of_memory_names_what_ran_out_and_the_knobs_to_turn() -> None:
    """A CUDA OOM says the stage (the context), the GPU's memory where torch can tell, and the spec fields that
    fit the run; a host MemoryError points at runtime.memory."""
    gpu = classify(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), TrainingError, "dpo").message
    assert gpu.startswith("dpo: GPU memory ran out")
    for knob in ("batchSize", "gradientAccumulationSteps", "gradientCheckpointing", "maxLength", "quantization"):
        assert knob in gpu, knob
    assert "Tried to allocate 2.00 GiB" in gpu, "torch's own words stay"
    host = classify(MemoryError(), DatasetError, "reading pairs").message
    assert "host memory ran out" in host and "spec.runtime.memory" in host
