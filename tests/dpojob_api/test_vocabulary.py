"""Every phase, condition type, stage and reason is written out once, in dpojob_api/vocabulary.py: the shipped
packages use the enums, never the strings. dpo_dev and the benchmarks are left out: they play the kubelet and
the user, who speak Kubernetes' words and the API's as data."""

from __future__ import annotations

import ast
import re
from enum import StrEnum
from pathlib import Path

import pytest

from dpojob_api import vocabulary
from dpojob_api.vocabulary import (
    EXIT_CODES,
    FAIL_AT_ONCE,
    REASONS,
    STAGE_WEIGHTS,
    TRAINER_REASONS,
    ConditionType,
    EventReason,
    JobConditionType,
    Phase,
    PodPhase,
    Reason,
    Stage,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("operator/dpojob_api", "operator/dpo_operator", "trainer_image/dpo_trainer")
REGISTRY = "operator/dpojob_api/vocabulary.py"
WORDS: tuple[type[StrEnum], ...] = (Phase, ConditionType, Stage, Reason, EventReason, PodPhase, JobConditionType)

OTHER_MEANINGS: dict[tuple[str, str], str] = {
    ("operator/dpojob_api/spec.py", "sft"): "the spec's sft section; also a TRL loss type",
    ("operator/dpojob_api/spec.py", "dpo"): "the spec's dpo section",
    ("operator/dpo_operator/kube.py", "data"): "a ConfigMap's data field",
    ("operator/dpo_operator/manifests.py", "data"): "the ConfigMap's data field, the data volume's name",
    ("trainer_image/dpo_trainer/card.py", "sft"): "a Hub tag of the model card",
    ("trainer_image/dpo_trainer/card.py", "dpo"): "a Hub tag of the model card",
    ("trainer_image/dpo_trainer/pipeline.py", "data"): "the spec's data section; summary.json's data key",
    ("trainer_image/dpo_trainer/pipeline.py", "sft"): "the spec's sft section (the sft stage's inputs)",
    ("trainer_image/dpo_trainer/pipeline.py", "dpo"): "the spec's dpo section (the dpo stage's inputs)",
    ("trainer_image/dpo_trainer/pipeline.py", "gates"): "spec.output.gates; summary.json's gates key",
}
"""Where one of the words means something else, said why."""


def string_literals(path: Path) -> set[str]:
    """Every string constant in a module (f-string parts included; whole docstrings never equal a word)."""
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def modules() -> dict[str, set[str]]:
    return {
        str(path.relative_to(REPO)): string_literals(path)
        for root in SHIPPED
        for path in sorted((REPO / root).rglob("*.py"))
    }


def test_each_word_is_written_out_only_in_the_vocabulary() -> None:
    words = {member.value for enum in WORDS for member in enum}
    found = modules()
    assert words <= found[REGISTRY]
    elsewhere = {
        (module, word)
        for module, literals in found.items()
        if module != REGISTRY
        for word in literals & words
        if (module, word) not in OTHER_MEANINGS
    }
    assert not elsewhere, f"use the dpojob_api.vocabulary enum instead of the string: {sorted(elsewhere)}"


def test_every_other_meaning_is_still_there() -> None:
    """An entry whose string is gone would let a new use of the word through unnoticed."""
    found = modules()
    stale = [pair for pair in OTHER_MEANINGS if pair[1] not in found.get(pair[0], set())]
    assert not stale


def test_the_scan_sees_a_word_written_out(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('PHASE = f"{x}" if x else "Failed"\nREASON = {"reason": "QualityGateFailed"}\n')
    assert {"Failed", "QualityGateFailed"} <= string_literals(module)


def test_every_reason_is_explained_and_every_trainer_reason_has_its_own_exit_code() -> None:
    assert set(REASONS) == set(Reason)
    codes = [EXIT_CODES[reason] for reason in TRAINER_REASONS]
    assert len(codes) == len(set(codes)) and set(EXIT_CODES) == set(TRAINER_REASONS)
    assert all(info.exit_code is None for reason, info in REASONS.items() if reason not in TRAINER_REASONS)
    assert Reason.SUCCEEDED not in FAIL_AT_ONCE and Reason.HUB_ERROR not in FAIL_AT_ONCE
    assert Reason.QUALITY_GATE_FAILED in FAIL_AT_ONCE


def test_stage_weights_follow_the_stage_order() -> None:
    assert list(STAGE_WEIGHTS) == list(Stage)


@pytest.mark.parametrize("enum", WORDS)
def test_words_are_camel_case_or_snake_case_identifiers(enum: type[StrEnum]) -> None:
    pattern = r"[a-z][a-z_]*" if enum is Stage else r"[A-Z][A-Za-z]*"
    assert all(re.fullmatch(pattern, member.value) for member in enum)


def test_the_registry_module_is_the_one_the_test_reads() -> None:
    assert Path(vocabulary.__file__).resolve() == REPO / REGISTRY
