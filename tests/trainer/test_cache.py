"""A Hugging Face cache that outlives the run (the pod's HF_HOME on spec.runtime.cacheVolume): a second DPOJob on
the same cache downloads no model or dataset file again, as the local Hub's request log shows."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo_dev.hub import HubRequest, LocalHub

from .conftest import HUB_TOKEN, HUB_USER, TINY_DATA, TINY_MODEL, hub_env, quickstart_job, run_cli

MODEL_REPO = f"{HUB_USER}/cached-tiny-llama"
DATASET_REPO = f"{HUB_USER}/cached-stack-exchange-paired"


@pytest.fixture(scope="module")
def repos(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny model as a model repo; the tiny pairs as parquet shards in the seed's data_dir layout."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo(MODEL_REPO, private=True)
    api.upload_folder(repo_id=MODEL_REPO, folder_path=TINY_MODEL)
    rows = [json.loads(line) for line in TINY_DATA.read_text().splitlines()]
    folder = tmp_path_factory.mktemp("parquet")
    for data_dir, part in (("finetune", rows), ("rl", rows[:200]), ("evaluation", rows[200:240])):
        (folder / "data" / data_dir).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / data_dir / "train-00000-of-00001.parquet")
    api.create_repo(DATASET_REPO, repo_type="dataset", private=True)
    api.upload_folder(repo_id=DATASET_REPO, repo_type="dataset", folder_path=folder)


def job(tmp: Path, name: str) -> dict:
    """A short run of the tiny recipe that reads the model and both stages' data from the Hub."""

    def source(data_dir: str) -> dict:
        return {"hub": {"name": DATASET_REPO, "dataDir": data_dir}}

    steps = {"maxSteps": 2, "evalSteps": 2, "loggingSteps": 1, "warmupSteps": 0}
    document = quickstart_job(
        model={"name": MODEL_REPO},
        data={"sft": {"evalSize": 8}, "dpo": {"evalSize": 8}},
        sft=steps,
        dpo=steps,
        output={"directory": str(tmp / f"{name}-model")},
    )
    data = document["spec"]["data"]
    data["sft"]["source"] = source("data/finetune")
    data["dpo"].update(source=source("data/rl"), evalSource=source("data/evaluation"))
    return document


def downloads(requests: list[HubRequest]) -> list[str]:
    """Paths whose contents were sent: GETs of .../resolve/<rev>/<file> (HEADs only ask for metadata)."""
    return [r.path for r in requests if r.method == "GET" and "/resolve/" in r.path and r.status < 300]


@pytest.mark.usefixtures("repos")
def test_a_second_run_on_the_same_cache_downloads_no_model_or_dataset_file(hub: LocalHub, tmp_path: Path) -> None:
    env = {**hub_env(hub), "HF_HOME": str(tmp_path / "shared-hf-home")}
    start = len(hub.requests)
    first = run_cli(job(tmp_path, "first"), tmp_path, "first", env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    middle = len(hub.requests)
    second = run_cli(job(tmp_path, "second"), tmp_path, "second", env=env)
    assert second.returncode == 0, second.stderr[-4000:]

    fetched = downloads(hub.requests[start:middle])
    assert any(p.startswith(f"/{MODEL_REPO}/resolve/") and p.endswith("/model.safetensors") for p in fetched), (
        "the first run downloads the model"
    )
    assert any(p.startswith(f"/datasets/{DATASET_REPO}/resolve/") and p.endswith(".parquet") for p in fetched), (
        "the first run downloads the dataset"
    )
    again = hub.requests[middle:]
    assert downloads(again) == [], "the second run fetched files again: " + ", ".join(downloads(again))
    assert not [r for r in again if r.method not in ("GET", "HEAD")], "a run that pushes nothing writes nothing"
