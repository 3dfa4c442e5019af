"""The committed spec reference is generated from the pydantic models and covers every field."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from dpo_dev import docs
from dpojob_api.spec import DPOJobSpec

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_matches_the_models() -> None:
    committed = (ROOT / docs.DOCS_FILE).read_text()
    assert committed == docs.render(), (
        f"{docs.DOCS_FILE} drifted from the spec: run `python -m dpo_dev.docs > {docs.DOCS_FILE}`"
    )


def nested_model(annotation: object) -> tuple[type[BaseModel] | None, str]:
    """The spec model inside a field's annotation (plain, optional or list items) and its path separator."""
    if typing.get_origin(annotation) is list:
        return nested_model(typing.get_args(annotation)[0])[0], "[]."
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, "."
    return None, "."


def field_paths(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """Every camelCase field path, found independently of the generator (from annotations, not the schema)."""
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        yield path
        inner, separator = nested_model(field.annotation)
        if inner is not None:
            yield from field_paths(inner, path + separator)


def test_every_field_has_a_described_row() -> None:
    rows = {r.path: r for r in docs.spec_rows()}
    paths = list(field_paths(DPOJobSpec))
    assert len(paths) > 100 and sorted(rows) == sorted(paths)
    text = docs.render()
    for path in paths:
        assert f"| `{path}` |" in text, path
        assert rows[path].description, f"{path} has no description (add a docstring under the field in spec.py)"


def test_rows_show_defaults_types_and_bounds() -> None:
    rows = {r.path: r for r in docs.spec_rows()}
    assert rows["dpo.beta"] == docs.Row("dpo.beta", "number", "`0.1`", "> 0", rows["dpo.beta"].description)
    assert rows["sft.lora.targetModules"].default == '`["q_proj", "v_proj"]`'
    assert rows["output.hub.repoId"].default == "required"
    assert rows["quantization.mode"].allowed == "one of `4bit`, `none`"
    assert rows["data.maxSamples"].type == "integer or null" and rows["data.maxSamples"].allowed == "≥ 1"
    assert rows["runtime.tolerations[].effect"].allowed.startswith("one of `NoSchedule`")
    assert rows["data.dpo.source"].allowed == "exactly one of `hub`, `files`"
    assert rows["runtime.nodeSelector"].type == "map of string to string"


def test_trainer_doc_links_the_reference_and_matches_the_trainer() -> None:
    """docs/trainer.md is hand-written: its exit-code table and stage list must follow the code."""
    from dpo_trainer.errors import ALL_ERRORS
    from dpo_trainer.pipeline import STAGES
    from dpojob_api.vocabulary import EXIT_CODES, TRAINER_REASONS, Reason

    text = (ROOT / "docs" / "trainer.md").read_text()
    assert "(spec-reference.md)" in text
    for error in ALL_ERRORS:
        assert f"| `{error.reason}` | {error.exit_code} |" in text, error.reason
    for name, info in TRAINER_REASONS.items():
        retried = "—" if name == Reason.SUCCEEDED else ("yes" if info.retried else "no: the run fails at once")
        assert f"| `{name}` | {EXIT_CODES[name]} | {retried} | {info.meaning} | {info.fix} |" in text, name
    assert {error.reason for error in ALL_ERRORS} | {Reason.SUCCEEDED} == set(TRAINER_REASONS)
    assert " → ".join(stage.name for stage in STAGES) in text
    for stage in STAGES:
        assert f"| `{stage.name}` |" in text, stage.name


def test_the_gpu_guide_says_what_to_change_for_every_operator_reason() -> None:
    """docs/gpu.md's troubleshooting table has a row for every reason a DPOJob can wait or fail with on the
    operator's side; the trainer's reasons are trainer.md's table (checked above), linked from there."""
    from dpojob_api.vocabulary import REASONS

    text = (ROOT / "docs" / "gpu.md").read_text()
    operator_reasons = {
        r for r, info in REASONS.items() if info.origin != "trainer" and not info.fix.startswith("nothing")
    }
    operator_reasons |= {"InvalidSpec", "OutOfMemory", "Queued"}
    for reason in operator_reasons:
        assert f"| `{reason}` |" in text, reason
    assert "trainer.md#exit-codes-and-the-termination-message" in text


def test_every_event_reason_the_operator_posts_is_in_the_events_section() -> None:
    """Every Event reason (vocabulary.EventReason, the pending problems of status.PENDING_EVENTS, and the phases
    an Event announces) is named in docs/operator.md's Events section (it once missed FailedCreate and NotOwned)."""
    import re

    from dpo_operator.status import PENDING_EVENTS
    from dpojob_api.vocabulary import EventReason, Reason

    posted = {*EventReason, *PENDING_EVENTS, Reason.RUNNING, Reason.SUCCEEDED, Reason.SUSPENDED}
    text = (ROOT / "docs/operator.md").read_text()
    section = text[text.index("## Events") : text.index("## Lifecycle")]
    documented = set(re.findall(r"`([A-Z][A-Za-z]+)`", section))
    assert posted <= documented, f"docs/operator.md ## Events: add {sorted(posted - documented)}"
