"""Turn the trainer's JSON progress lines (its pod log) into status fields. Pure: no cluster access.

The trainer prints one JSON object per line with ``"kind": "dpo-trainer/progress"``; everything else in the
log (progress bars, warnings) is ignored. Reading the pod log means trainer pods need no API rights at all.

Pod output is untrusted input: anything running in the pod can print such a line. Each event is validated
against ProgressEvent (types, ranges, a time not in the future, at most MAX_METRICS metric keys of a sane
shape); a line that fails is ignored like any other log line, so no line can stop or corrupt status.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from dpojob_api.progress import PROGRESS_KIND, ProgressEvent, bounded_metrics, finite, status_metrics
from dpojob_api.status import MAX_RULE_HITS
from dpojob_api.vocabulary import STAGE_WEIGHTS, Stage

_MARKER = '{"kind": "' + PROGRESS_KIND + '"'
_STAGES = list(Stage)


def parse_line(line: str) -> dict[str, Any] | None:
    """The validated progress event in one log line, or None for any other line (and for invalid events).

    The event may follow other output on the same line: a progress bar redrawn with carriage returns has no
    newline of its own, and a container with a TTY (or a runtime merging stderr into stdout) glues them.
    """
    start = line.rfind(_MARKER)
    if start < 0:
        return None
    try:
        raw = json.loads(line[start:])
        if isinstance(raw, dict) and isinstance(raw.get("summary"), dict):
            summary = raw["summary"]
            raw["summary_metrics"] = summary.get("metrics")
            raw["summary_efficiency"] = summary.get("efficiency") or {}
            raw["summary_provenance"] = summary.get("provenance") or {}
        return ProgressEvent.model_validate(raw).model_dump()
    except (ValueError, ValidationError, RecursionError):
        return None


def _rfc3339(timestamp: float) -> str:
    """Millisecond precision: status compares report times to refuse going backwards on a log replay."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class TrainerProgress:
    """What the trainer has reported so far for one pod, folded from its events in order."""

    stage: Stage | None = None
    step: int = 0
    total_steps: int = 0
    first_seen: tuple[float, int] | None = None
    """(time, step) of the first step this pod reported in the current stage: the rate is measured from there, so
    a stage resumed at step 900 of 1,000 is not taken to run 900 steps in its first seconds."""
    updated: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    done: bool = False
    events_seen: int = 0
    rules: list[dict[str, Any]] = field(default_factory=list)
    """Stop rules that fired (status.rules), each once."""
    efficiency: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    preflight: dict[str, Any] = field(default_factory=dict)
    """status.preflight: the estimated peak GPU memory per training stage, and the GPU's."""
    sft_model: dict[str, Any] = field(default_factory=dict)
    """status.sftModel: the run's shared SFT model (trained, reused or waited for), from the latest sft_model event."""
    """status.efficiency and status.provenance, from the `done` event's summary."""

    def apply(self, event: dict[str, Any]) -> None:
        """Fold one progress event (in log order), as parse_line validated it."""
        self.events_seen += 1
        kind, stage, when = event.get("event"), event.get("stage"), event.get("time")
        if finite(when):
            self.updated = float(when)
        if kind == "preflight" and event["estimates"]:
            self.preflight = {"estimatedGiB": event["estimates"]}
            if event["gpuMemoryGiB"] is not None:
                self.preflight["gpuMemoryGiB"] = event["gpuMemoryGiB"]
        elif kind == "sft_model" and event["digest"] and event["source"]:
            self.sft_model = {"digest": event["digest"], "source": event["source"], "message": event["message"]}
            if event["origin"]:
                self.sft_model["from"] = event["origin"]
        elif kind == "rule" and stage in STAGE_WEIGHTS and event["rule"] and event["action"] and event["reason"]:
            hit = {k: event[k] for k in ("stage", "rule", "action", "reason", "step", "message")}
            seen = {(h["stage"], h["rule"]) for h in self.rules}
            if (stage, hit["rule"]) not in seen and len(self.rules) < MAX_RULE_HITS:
                self.rules.append(hit)
        elif kind == "stage_start" and stage in STAGE_WEIGHTS:
            self.stage, self.step, self.total_steps, self.first_seen = Stage(stage), 0, 0, None
            if stage in (Stage.SFT, Stage.DPO):
                self.metrics = {}  # each training stage reports its own loss; don't mix SFT's into DPO's
        elif kind == "log":
            if stage in STAGE_WEIGHTS and stage != self.stage:
                self.stage, self.first_seen = Stage(stage), None
            self.step, self.total_steps = event["step"], event["totalSteps"]
            if self.first_seen is None and self.updated is not None:
                self.first_seen = (self.updated, self.step)
            self.metrics = bounded_metrics({**self.metrics, **event["metrics"]})
        elif kind == "done":
            self.done = True
            self.stage = Stage.PUSH
            self.metrics = bounded_metrics({**self.metrics, **event["summary_metrics"]})
            self.efficiency, self.provenance = event["summary_efficiency"], event["summary_provenance"]

    def percent(self) -> int:
        """Share of the whole run done, weighting stages by how long they usually take."""
        if self.done:
            return 100
        if self.stage is None:
            return 0
        before = sum(STAGE_WEIGHTS[s] for s in _STAGES[: _STAGES.index(self.stage)])
        within = self.step / self.total_steps if self.total_steps else 0.0
        return min(99, int(100 * (before + within * STAGE_WEIGHTS[self.stage]) / sum(STAGE_WEIGHTS.values())))

    def seconds_per_step(self) -> float | None:
        """The current stage's pace since this pod first reported a step of it."""
        if self.first_seen is None or self.updated is None or self.step <= self.first_seen[1]:
            return None
        return (self.updated - self.first_seen[0]) / (self.step - self.first_seen[1])

    def stage_eta_seconds(self) -> int | None:
        """Seconds left in the current stage at its pace."""
        pace = self.seconds_per_step()
        return None if pace is None else max(0, round(pace * (self.total_steps - self.step)))

    def eta_seconds(self) -> int | None:
        """Seconds left in the whole run: the current stage at its pace, the later stages at the time per unit of
        STAGE_WEIGHTS this stage takes (an estimate: the weights are typical shares of a run)."""
        stage_left, pace = self.stage_eta_seconds(), self.seconds_per_step()
        if stage_left is None or pace is None or self.stage is None:
            return None
        per_weight = pace * self.total_steps / STAGE_WEIGHTS[self.stage]
        later = sum(STAGE_WEIGHTS[s] for s in _STAGES[_STAGES.index(self.stage) + 1 :])
        return stage_left + round(per_weight * later)

    def status_fields(self) -> dict[str, Any]:
        """The status fields this progress determines (camelCase, ready for a merge patch)."""
        if self.stage is None and not self.metrics:
            early = {"rules": self.rules, "preflight": self.preflight, "sftModel": self.sft_model}
            return {key: value for key, value in early.items() if value}
        eta = 0 if self.done else self.eta_seconds()
        fields: dict[str, Any] = {
            "progress": {
                "step": self.step,
                "totalSteps": self.total_steps,
                "percent": self.percent(),
                "etaSeconds": eta,
                "eta": human_duration(eta),
                "stageEtaSeconds": 0 if self.done else self.stage_eta_seconds(),
                "updatedAt": _rfc3339(self.updated) if self.updated else None,
            }
        }
        if self.stage is not None:
            fields["stage"] = self.stage
        if self.metrics:
            fields.update(status_metrics(self.metrics))
        if self.rules:
            fields["rules"] = self.rules
        if self.efficiency:
            fields["efficiency"] = self.efficiency
        if self.provenance:
            fields["provenance"] = self.provenance
        if self.preflight:
            fields["preflight"] = self.preflight
        if self.sft_model:
            fields["sftModel"] = self.sft_model
        return fields


def human_duration(seconds: int | None) -> str | None:
    """3h12m, 4m05s, 40s: an ETA for the printer column."""
    if seconds is None:
        return None
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
