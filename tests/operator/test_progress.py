"""Folding the trainer's JSON progress lines into status fields."""

import json
from typing import get_args

import pytest

from dpo_operator.progress import TrainerProgress, human_duration, parse_line
from dpojob_api.progress import (
    MAX_METRICS,
    Done,
    EventKind,
    Preflight,
    ProgressLine,
    RuleFired,
    SFTModel,
    StageEnd,
    StageLog,
    StageStart,
    TrainerFailed,
)
from dpojob_api.vocabulary import Reason, Stage


def line(event: str, **fields) -> str:
    return json.dumps({"kind": "dpo-trainer/progress", "event": event, **fields})


def fold(progress: TrainerProgress, text: str) -> bool:
    """What the log follower does with one line."""
    event = parse_line(text)
    if event is not None:
        progress.apply(event)
    return event is not None


def test_other_lines_are_ignored() -> None:
    progress = TrainerProgress()
    for text in ("", "loading model", "{not json", '{"kind": "other"}', "  5%|##   | 1/20"):
        assert not fold(progress, text)
    assert progress.status_fields() == {}
    assert parse_line(line("log", step=1)) is not None
    glued = "\r 10%|#         | 3/30 [00:00<00:01]" + line("log", stage="sft", step=5, totalSteps=30)
    assert parse_line(glued)["step"] == 5, "a progress bar without a newline may precede the event"


def test_log_events_become_progress_metrics_and_rewards() -> None:
    progress = TrainerProgress()
    fold(progress, line("stage_start", stage="sft", time=100.0))
    fold(progress, line("log", stage="sft", step=5, totalSteps=10, time=110.0, metrics={"loss": 2.0}))
    assert progress.status_fields()["progress"]["etaSeconds"] is None, "one report: no pace yet"
    fold(progress, line("log", stage="sft", step=8, totalSteps=10, time=116.0, metrics={"loss": 1.5}))
    sft = progress.status_fields()
    assert sft["stage"] == "sft" and sft["progress"]["step"] == 8 and sft["progress"]["stageEtaSeconds"] == 4
    # 2 s a step, 20 s for this stage's 40 weight units: the later stages' 60 units take 30 s more.
    assert sft["progress"]["etaSeconds"] == 34 and sft["progress"]["eta"] == "34s"
    assert sft["metrics"] == {"loss": 1.5} and "rewards" not in sft
    fold(progress, line("stage_end", stage="sft", time=120.0, seconds=20))
    fold(progress, line("stage_start", stage="sft_merge", time=121.0))
    assert progress.status_fields()["stage"] == "sft_merge", "each stage by the name the trainer gives it"
    fold(progress, line("stage_start", stage="dpo", time=130.0))
    metrics = {"loss": 0.69, "rewards/margins": 0.1, "rewards/accuracies": 0.5, "eval_rewards/margins": 0.05}
    fold(progress, line("log", stage="dpo", step=2, totalSteps=4, time=134.0, metrics=metrics))
    dpo = progress.status_fields()
    assert dpo["stage"] == "dpo"
    assert dpo["metrics"] == dict(sorted(metrics.items())), "SFT metrics must not leak into DPO's"
    assert dpo["rewards"] == {"margins": 0.1, "accuracies": 0.5} and dpo["evalRewards"] == {"margins": 0.05}
    assert sft["progress"]["percent"] < dpo["progress"]["percent"] < 100


def test_a_resumed_stage_is_timed_from_where_this_pod_took_it_up() -> None:
    """Resumed at step 900 of 1,000: the pace is measured from step 900, so the ETA is not taken from 900 steps
    that seemed to pass in a second."""
    progress = TrainerProgress()
    fold(progress, line("stage_start", stage="dpo", time=200.0))
    fold(progress, line("log", stage="dpo", step=900, totalSteps=1000, time=201.0))
    fold(progress, line("log", stage="dpo", step=910, totalSteps=1000, time=221.0))
    fields = progress.status_fields()["progress"]
    # 2 s a step: 180 s left in DPO; 2,000 s for its 50 weight units, so the 6 units after it take 240 s.
    assert fields["stageEtaSeconds"] == 180 and fields["etaSeconds"] == 420 and fields["eta"] == "7m00s"
    assert human_duration(3 * 3600 + 12 * 60 + 5) == "3h12m" and human_duration(245) == "4m05s"


def test_done_is_100_percent_with_final_metrics() -> None:
    progress = TrainerProgress()
    fold(progress, line("stage_start", stage="dpo", time=1.0))
    fold(progress, line("done", time=9.0, summary={"metrics": {"rewards/accuracies": 0.9, "loss": float("nan")}}))
    fields = progress.status_fields()
    assert fields["progress"]["percent"] == 100 and fields["stage"] == "push"
    assert fields["rewards"] == {"accuracies": 0.9} and "loss" not in fields["metrics"]


def test_hostile_lines_are_ignored_and_later_progress_still_counts() -> None:
    """Pod output is untrusted: none of these may raise, stick, or reach status (issue: operator core v2, #3)."""
    progress = TrainerProgress()
    fold(progress, line("stage_start", stage="dpo", time=100.0))
    hostile = [
        line("log", stage="dpo", step=1, totalSteps=10, time=1e12),  # far future: froze replays, broke status
        line("log", stage="dpo", step="x", totalSteps=10, time=101.0),
        line("log", stage="dpo", step=1, totalSteps=10, time=101.0, metrics=[1, 2]),
        '{"kind": "dpo-trainer/progress", "event": "log", "step": 1e400, "time": 101.0}',
        line("log", stage="dpo", step=-5, totalSteps=10, time=101.0),
        line("log", stage="dpo", step=1, totalSteps=10, time=float("inf")),
        line("launch_missiles", stage="dpo", time=101.0),
        '{"kind": "dpo-trainer/progress", "event": "log", "metrics": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ]
    for text in hostile:
        assert not fold(progress, text), text[:80]
    fold(progress, line("log", stage="dpo", step=3, totalSteps=10, time=102.0, metrics={"rewards/margins": 0.3}))
    fields = progress.status_fields()
    assert fields["progress"]["step"] == 3 and fields["rewards"] == {"margins": 0.3}
    assert fields["progress"]["updatedAt"].startswith("1970-01-01T00:01:42")


def test_metric_keys_are_bounded() -> None:
    progress = TrainerProgress()
    flood = {f"junk/{i}": 1.0 for i in range(10_000)} | {"x" * 5000: 1.0, "rewards/accuracies": 0.8, "loss": 0.5}
    assert fold(progress, line("log", stage="dpo", step=1, totalSteps=2, time=1.0, metrics=flood))
    fold(progress, line("log", stage="dpo", step=2, totalSteps=2, time=2.0, metrics={"more/junk": 1.0}))
    metrics = progress.status_fields()["metrics"]
    assert len(metrics) == MAX_METRICS and "x" * 5000 not in metrics
    assert metrics["rewards/accuracies"] == 0.8 and metrics["loss"] == 0.5, "rewards and loss are kept first"


def test_every_trainer_stage_has_a_weight_and_is_a_status_stage() -> None:
    """The trainer's stage table is the source of truth; the operator must know each stage it can report."""
    from dpo_trainer.pipeline import STAGES
    from dpojob_api.vocabulary import STAGE_WEIGHTS, Stage

    names = [stage.name for stage in STAGES]
    assert list(STAGE_WEIGHTS) == names and list(Stage) == names


def test_status_shows_metrics_to_four_significant_digits() -> None:
    """The LOSS column must read 0.4532, not 0.4532301902770996 (the card and summary.json keep every digit)."""
    progress = TrainerProgress()
    metrics = {"loss": 0.4532301902770996, "rewards/margins": 0.000123456, "eval_rewards/accuracies": 0.87654}
    fold(progress, line("log", stage="dpo", step=1, totalSteps=2, time=1.0, metrics=metrics))
    fields = progress.status_fields()
    assert fields["metrics"]["loss"] == 0.4532 and fields["rewards"] == {"margins": 0.0001235}
    assert fields["evalRewards"] == {"accuracies": 0.8765}


@pytest.mark.parametrize(
    "written",
    [
        StageStart(stage=Stage.SFT),
        StageLog(stage=Stage.DPO, step=3, totalSteps=10, epoch=0.5, metrics={"loss": 0.5, "rewards/margins": 0.2}),
        StageEnd(stage=Stage.DPO, seconds=2.0, skipped=True),
        Done(summary={"metrics": {"eval_loss": 0.4}, "stages": {}}),
        TrainerFailed(reason=Reason.DATASET_ERROR, message="no column x"),
        RuleFired(stage=Stage.DPO, step=10, rule="flat", action="finish", reason=Reason.STOPPED_BY_RULE, message="m"),
        Preflight(estimates={"sft": 24.6, "dpo": 10.6}, gpuMemoryGiB=79.2),
        SFTModel(digest="0123456789abcdef", source="reused", origin="team/sweep-a", message="reused x from y"),
    ],
    ids=lambda line: line.event,
)
def test_every_line_the_trainer_writes_is_read_as_written(written: ProgressLine) -> None:
    """The writer's models (the trainer's, the benchmarks') and the operator's reader agree on the wire format."""
    read = parse_line("step 3/10 |####| " + written.line())
    assert read is not None and read["event"] == written.event and read["time"] == pytest.approx(written.time)
    fields = written.model_dump()
    assert {key: read[key] for key in fields if key in read} == {key: fields[key] for key in fields if key in read}
    if isinstance(written, Done):
        assert read["summary_metrics"] == {"eval_loss": 0.4}


def test_the_reader_knows_every_kind_the_writer_writes() -> None:
    kinds = {line.model_fields["event"].default for line in get_args(ProgressLine)}
    assert kinds == set(get_args(EventKind))


def test_rule_events_are_folded_once_per_rule_and_hostile_ones_dropped() -> None:
    progress = TrainerProgress()
    fired = RuleFired(stage=Stage.DPO, step=10, rule="noted", action="warn", reason="MetricRule", message="m\n x")
    for text in (
        fired.line(),
        fired.line(),  # a replayed log
        line("rule", stage="dpo", step=12, rule="BAD NAME", action="warn", reason="MetricRule", message="x"),
        line("rule", stage="dpo", step=12, rule="x", action="explode", reason="MetricRule", message="x"),
        line("rule", stage="dpo", step=12, rule="y", action="warn", reason="not camel", message="x" * 5000),
    ):
        fold(progress, text)
    assert progress.status_fields()["rules"] == [
        {"stage": "dpo", "rule": "noted", "action": "warn", "reason": "MetricRule", "step": 10, "message": "m x"}
    ]


def test_the_done_summary_gives_efficiency_and_provenance_and_drops_what_does_not_validate() -> None:
    progress = TrainerProgress()
    summary = {
        "metrics": {"loss": 0.5},
        "efficiency": {"dpo": {"seconds": 12.5, "gpuHours": 0.0035, "samplesPerSecond": 3.2}, "evil": {"x": 1}},
        "provenance": {
            "model": {"name": "meta-llama/Llama-2-7b-hf", "revision": "main", "sha": "a" * 40},
            "datasets": [{"name": "lvwerra/stack-exchange-paired", "revision": "main", "sha": "b" * 40}],
            "libraries": {"trl": "1.16.0"},
        },
    }
    fold(progress, Done(summary=summary).line())
    fields = progress.status_fields()
    assert fields["efficiency"] == {"dpo": {"seconds": 12.5, "gpuHours": 0.0035, "samplesPerSecond": 3.2}}
    assert fields["provenance"] == {
        "model": "meta-llama/Llama-2-7b-hf@main",
        "modelSha": "a" * 40,
        "datasets": ["lvwerra/stack-exchange-paired@" + "b" * 40],
        "libraries": {"trl": "1.16.0"},
    }
    hostile = TrainerProgress()
    fold(hostile, Done(summary={"efficiency": {"dpo": {"seconds": -1}}, "provenance": {"model": 5}}).line())
    assert "efficiency" not in hostile.status_fields() and "provenance" not in hostile.status_fields()


def test_the_preflight_estimate_reaches_status_and_a_hostile_one_is_bounded() -> None:
    progress = TrainerProgress()
    fold(progress, Preflight(estimates={"sft": 24.6, "dpo": 10.6}, gpuMemoryGiB=79.2).line())
    assert progress.status_fields() == {"preflight": {"estimatedGiB": {"sft": 24.6, "dpo": 10.6}, "gpuMemoryGiB": 79.2}}
    hostile = TrainerProgress()
    fold(hostile, line("preflight", estimates={"evil": 1.0, "sft": -3, "dpo": "x"}, gpuMemoryGiB=-1))
    assert hostile.status_fields() == {}


def test_the_sft_model_reaches_status_the_latest_word_winning_and_a_hostile_one_is_dropped() -> None:
    progress = TrainerProgress()
    waiting = SFTModel(digest="0123456789abcdef", source="waiting", origin="team/a", message="waiting for x")
    fold(progress, waiting.line())
    assert progress.status_fields() == {
        "sftModel": {"digest": "0123456789abcdef", "source": "waiting", "from": "team/a", "message": "waiting for x"}
    }
    fold(progress, SFTModel(digest="0123456789abcdef", source="reused", origin="team/a", message="reused").line())
    assert progress.status_fields()["sftModel"]["source"] == "reused"
    hostile = TrainerProgress()
    for text in (
        line("sft_model", digest="../../etc", source="reused", origin="x"),
        line("sft_model", digest="0123456789abcdef", source="stolen", origin="x"),
    ):
        fold(hostile, text)
    assert hostile.status_fields() == {}
    odd_origin = TrainerProgress()
    fold(odd_origin, line("sft_model", digest="0123456789abcdef", source="reused", origin="a\nb" + "x" * 600))
    assert "from" not in odd_origin.status_fields()["sftModel"]
