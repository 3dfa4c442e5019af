"""What a model came from: the exact base-model and dataset revisions (commit SHAs, resolved once, when a run first
starts in its work directory), the libraries that trained it, and what each training stage cost.

Recorded in DIR/provenance.json (a resumed run keeps what its first pod resolved: the revision it trained), then
in summary.json, the `done` event (status.provenance, status.efficiency) and the model card, so that someone else
can train the same model from the card alone.
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from dpo_trainer.context import RunContext
from dpo_trainer.specfile import looks_like_path
from dpojob_api.progress import ResolvedRepo, RunProvenance
from dpojob_api.spec import DPOJobSpec
from dpojob_api.vocabulary import TrainingStage

log = logging.getLogger(__name__)
LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "huggingface_hub")
"""The libraries whose versions decide how a model trains."""
THROUGHPUT = {"train_samples_per_second": "samplesPerSecond", "train_steps_per_second": "stepsPerSecond"}
"""The Trainer's end-of-training counters, by their names in status.efficiency."""


def library_versions() -> dict[str, str]:
    """Installed versions of LIBRARIES (absent ones left out)."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _hub_datasets(spec: DPOJobSpec) -> list[tuple[str, str | None]]:
    """(name, revision) of every Hub dataset the run reads."""
    data = spec.data
    sources = [data.dpo.source, data.dpo.eval_source] if data.dpo else []
    if spec.sft.enabled and data.sft:
        sources.append(data.sft.source)
    found = {(s.hub.name, s.hub.revision) for s in sources if s is not None and s.hub is not None}
    return sorted(found, key=lambda pair: (pair[0], pair[1] or ""))


def _commit(kind: str, name: str, revision: str | None, token: str | None) -> str | None:
    """The commit SHA `revision` (default: main) of a Hub repository now, or None when the Hub cannot say."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        info = (api.model_info if kind == "model" else api.dataset_info)(name, revision=revision)
    except Exception as exc:  # the stage that downloads it reports a real problem with its own reason
        log.warning("could not resolve %s %s@%s: %s", kind, name, revision or "main", type(exc).__name__)
        return None
    return info.sha


def resolve(spec: DPOJobSpec, token: str | None) -> dict[str, Any]:
    """The base model's and the datasets' exact revisions, and the libraries, as of now (a RunProvenance)."""
    name, revision = spec.model.name, spec.model.revision
    if looks_like_path(name):
        model = ResolvedRepo(name=name, local=True)
    else:
        model = ResolvedRepo(name=name, revision=revision or "main", sha=_commit("model", name, revision, token))
    datasets = [
        ResolvedRepo(name=name, revision=revision or "main", sha=_commit("dataset", name, revision, token))
        for name, revision in _hub_datasets(spec)
    ]
    return RunProvenance(model=model, datasets=datasets, libraries=library_versions()).model_dump(mode="json")


def record(ctx: RunContext) -> dict[str, Any]:
    """DIR/provenance.json: resolved when the work directory is new, kept as is when a run resumes in it."""
    path = ctx.layout.root / "provenance.json"
    recorded = ctx.read_json(path)
    if recorded is None:
        recorded = resolve(ctx.spec, ctx.token)
        ctx.write_json(path, recorded)
    return recorded


def efficiency(ctx: RunContext, stages: list[TrainingStage]) -> dict[str, dict[str, float]]:
    """Per training stage: wall seconds, samples and steps per second (the Trainer's end-of-training counters, from
    its log history) and GPU-hours (wall time times the GPUs the pod asked for)."""
    gpus = ctx.spec.runtime.gpus
    result = {}
    for stage in stages:
        history = ctx.read_json(ctx.layout.log_history(stage)) or []
        metrics: dict[str, Any] = next((e for e in reversed(history) if "train_runtime" in e), {})
        timing = ctx.timings.get(stage) or {}
        seconds = float(timing.get("seconds") or metrics.get("train_runtime") or 0.0)
        entry = {"seconds": round(seconds, 1), "gpuHours": round(seconds * gpus / 3600, 4)}
        for key, name in THROUGHPUT.items():
            if isinstance(metrics.get(key), int | float):
                entry[name] = round(float(metrics[key]), 3)
        result[stage.value] = entry
    return result
