"""Reading the DPOJob manifest and resolving its local paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from dpo_trainer.errors import DatasetError, InvalidSpec, ModelLoadError
from dpo_trainer.specfile import load_job, looks_like_path, parse_job, read_job, resolve_local_paths, run_metadata
from dpojob_api.progress import SPEC_DIGEST_ENV

from .conftest import QUICKSTART, REPO, deep_merge, quickstart_job


def test_quickstart_resolves_against_the_current_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    job = load_job(QUICKSTART)
    assert job.metadata["name"] == "quickstart"
    spec = resolve_local_paths(job.spec)
    assert spec.model.name == str(REPO / "examples/assets/tiny-llama")
    assert spec.data.dpo is not None and spec.data.dpo.source.files is not None
    assert spec.data.dpo.source.files.paths == [str(REPO / "examples/assets/tiny-stack-exchange.jsonl")]
    assert job.spec.model.name == "./examples/assets/tiny-llama"  # the given spec is left untouched


def test_paths_are_checked_from_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = load_job(QUICKSTART).spec
    with pytest.raises(ModelLoadError, match=r"model.name: local model directory .* does not exist"):
        resolve_local_paths(spec)
    spec.model.name = str(REPO / "examples/assets/tiny-llama")
    with pytest.raises(DatasetError, match=r"data.sft.source.files.paths: no file matches"):
        resolve_local_paths(spec)


def test_hub_ids_are_not_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert not looks_like_path("meta-llama/Llama-2-7b-hf")
    assert not looks_like_path("gpt2")
    assert looks_like_path("./model") and looks_like_path("/models/x") and looks_like_path("~/m")
    (tmp_path / "local-model").mkdir()
    assert looks_like_path("local-model")


def test_document_selection_and_yaml_errors(tmp_path: Path) -> None:
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text("---\n---\n" + QUICKSTART.read_text())  # empty documents are ignored
    assert load_job(spec_file).spec.dpo.max_steps == 40
    spec_file.write_text(QUICKSTART.read_text() + "---\n" + QUICKSTART.read_text())
    with pytest.raises(InvalidSpec, match=r"exactly one document of kind DPOJob, found kinds \['DPOJob', 'DPOJob'\]"):
        load_job(spec_file)
    spec_file.write_text("apiVersion: dpo-operator.io/v1alpha1\nkind: DPOJob\nmetadata: {name: x}\n")
    with pytest.raises(InvalidSpec, match="has no spec"):
        load_job(spec_file)
    with pytest.raises(InvalidSpec, match="cannot read"):
        load_job(tmp_path / "missing.yaml")


def test_gates_need_an_evaluation_and_not_worse_than_target_needs_hub() -> None:
    """Checked before anything loads: a gate that could only fail after hours of training is an InvalidSpec."""
    job = quickstart_job(output={"gates": {"minEvalRewardAccuracy": 0.6, "maxEvalLoss": 0.7}})
    assert parse_job(job).spec.output.gates is not None
    no_eval = deep_merge(job, {"spec": {"data": {"dpo": {"evalSize": 0}}}})
    with pytest.raises(InvalidSpec, match=r"output.gates.minEvalRewardAccuracy, output.gates.maxEvalLoss: needs DPO"):
        parse_job(no_eval)
    no_hub = quickstart_job(output={"gates": {"notWorseThanTarget": True}})
    with pytest.raises(InvalidSpec, match=r"spec.output: gates.notWorseThanTarget needs hub"):
        parse_job(no_hub)
    with pytest.raises(InvalidSpec, match=r"spec.output.gates.minEvalRewardAccuracy: Input should be less"):
        parse_job(quickstart_job(output={"gates": {"minEvalRewardAccuracy": 1.5}}))


def test_run_metadata_carries_the_generation_and_the_operators_spec_hash(tmp_path: Path) -> None:
    """The card's spec hash is status.internal.specHash: the operator's hash of the spec exactly as applied."""
    from dpojob_api.spec import spec_hash

    job = quickstart_job()
    job["metadata"]["generation"] = 4
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    document = read_job(spec_file)
    metadata = run_metadata(document, parse_job(document))
    assert metadata["generation"] == 4 and metadata["name"] == "quickstart"
    assert metadata["spec_hash"] == spec_hash(yaml.safe_load(QUICKSTART.read_text())["spec"])
    assert run_metadata(document, parse_job({**document, "metadata": {"generation": "4"}}))["generation"] is None


def test_a_spec_file_other_than_the_one_the_operator_wrote_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's ConfigMap replaced after its Job was created: the Job's DPO_SPEC_SHA256 no longer matches."""
    written = QUICKSTART.read_bytes()
    spec_file = tmp_path / "dpojob.yaml"
    spec_file.write_bytes(written)
    monkeypatch.setenv(SPEC_DIGEST_ENV, hashlib.sha256(written).hexdigest())
    assert read_job(spec_file)["kind"] == "DPOJob"
    spec_file.write_bytes(written + b"\n# changed after the Job was created\n")
    with pytest.raises(InvalidSpec, match="not the spec the operator wrote"):
        read_job(spec_file)
