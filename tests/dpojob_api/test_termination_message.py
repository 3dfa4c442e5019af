"""The termination message as both sides take it: field by field, never raising."""

from dpojob_api.progress import MAX_LOCATION_LENGTH, TerminationMessage, TrainedModel
from dpojob_api.status import ModelLocation


def test_a_bad_field_drops_only_itself() -> None:
    text = (
        '{"reason": "HubError", "message": ["push", "failed"], "metrics": {"loss": 1e999, "eval_loss": 0.5},'
        ' "model": {"repoId": "org/m", "commitSha": 12, "commitUrl": "' + "u" * (MAX_LOCATION_LENGTH + 1) + '"},'
        ' "extra": {"ignored": true}}'
    )
    assert TerminationMessage.parse(text).to_document() == {
        "reason": "HubError",
        "metrics": {"eval_loss": 0.5},
        "model": {"repoId": "org/m"},
    }


def test_what_is_not_a_json_object_reads_as_an_empty_message() -> None:
    for text in (None, "", "OOM\n", "[]", "1e999", "{" * 10_000, '{"reason": "A"'):
        assert TerminationMessage.parse(text) == TerminationMessage()


def test_the_model_location_has_the_fields_of_status_model() -> None:
    """The trainer reports what status.model holds, by the same camelCase names."""
    assert {f.alias for f in TrainedModel.model_fields.values()} == {
        f.alias for f in ModelLocation.model_fields.values()
    }
