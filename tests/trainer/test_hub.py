"""The push stage against the local Hub: what arrives, what it replaces, when it warns, how a bad token fails."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from dpo_dev.hub import LocalHub
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.errors import HubError
from dpo_trainer.hub import run as push_stage
from dpo_trainer.hub import tag_commit
from dpo_trainer.layout import CARD_FILE, PLOT_FILE, RunLayout
from dpo_trainer.progress import Reporter
from dpojob_api.spec import DPOJobSpec

from .conftest import HUB_TOKEN, PUSH_BRANCH, PUSH_REPO, CliRun, assert_failed, hub_env, quickstart_job, run_cli


def test_pushed_files_download_identical(quickstart_run: CliRun, hub: LocalHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    assert api.model_info(PUSH_REPO).private is True
    head = api.list_repo_commits(PUSH_REPO, revision=PUSH_BRANCH)[0].commit_id
    assert head == quickstart_run.summary()["model"]["commitSha"]
    local = quickstart_run.layout.model
    downloaded = Path(
        snapshot_download(PUSH_REPO, revision=PUSH_BRANCH, endpoint=hub.url, token=HUB_TOKEN, cache_dir=tmp_path)
    )
    expected = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    got = {p.name: p.read_bytes() for p in downloaded.iterdir() if p.is_file() and p.name != ".gitattributes"}
    assert got == expected
    assert {"model.safetensors", "tokenizer.json", CARD_FILE, PLOT_FILE} <= set(got)


@pytest.mark.parametrize(("token", "fragment"), [("bad-token-0123456789", "HTTP 401"), ("", "HF_TOKEN is empty")])
def test_push_with_a_bad_or_no_token_fails_before_training(
    hub: LocalHub, tmp_path: Path, token: str, fragment: str
) -> None:
    job = quickstart_job(output={"hub": {"repoId": "tester/never-pushed"}})
    run = run_cli(job, tmp_path, env=hub_env(hub, token))
    assert_failed(run, "HubAuthError", fragment)
    assert not [e for e in run.events if e["event"] == "stage_start"]
    if token:
        assert token not in run.stdout + run.stderr + json.dumps(run.termination)


def test_a_tag_is_never_moved_to_another_commit(hub: LocalHub) -> None:
    """A retried push finds its own tag; a tag of that name on another commit (an earlier DPOJob of the same name
    starting again at generation 1) is a HubError, not a silently moved pin."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    repo_id = api.create_repo("tester/tag-clash").repo_id
    first = api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=b"2", path_in_repo="a.txt", repo_id=repo_id)
    tag_commit(api, repo_id, "run-g1", first.oid, first.commit_url)
    tag_commit(api, repo_id, "run-g1", first.oid, first.commit_url)
    with pytest.raises(HubError, match=f"tag run-g1 of {repo_id} already names commit {first.oid} .*: the model is"):
        tag_commit(api, repo_id, "run-g1", second.oid, second.commit_url)
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags} == {"run-g1": first.oid}


def _push(hub: LocalHub, tmp_path: Path, repo_id: str, files: dict[str, bytes], **output_hub: object) -> str:
    """The push stage itself, in process, of a model folder holding `files`; returns its commit."""
    from huggingface_hub import constants

    spec = DPOJobSpec.model_validate({"output": {"hub": {"repoId": repo_id, "runRevision": "none", **output_hub}}})
    layout = RunLayout(tmp_path / "run")
    layout.model.mkdir(parents=True, exist_ok=True)
    for old in layout.model.iterdir():
        old.unlink()
    for name, data in files.items():
        (layout.model / name).write_bytes(data)
    ctx = RunContext(spec, layout, Reporter(io.StringIO()), HUB_TOKEN, RunState(layout.state), {"name": "m"})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", hub.url)
        push_stage(ctx)
    return json.loads(layout.push_result.read_text())["commitSha"]


SHARDED = {
    "config.json": b"{}",
    "model-00001-of-00002.safetensors": b"shard 1",
    "model-00002-of-00002.safetensors": b"shard 2",
    "model.safetensors.index.json": b'{"weight_map": {}}',
}


def test_a_push_deletes_the_stale_weight_files_of_the_previous_model_in_its_commit(
    hub: LocalHub, tmp_path: Path
) -> None:
    """A model sharded now must not sit beside an earlier push's single file (or the reverse): loaders would pick
    either. Files users keep in the repo, weights in a folder of theirs included, stay."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    repo_id = api.create_repo("tester/reshaped", private=True).repo_id
    users = {"notes.md": b"ours", "onnx/model.safetensors": b"onnx", "training_args.bin": b"args"}
    for path, data in {"model.safetensors": b"old single file", "pytorch_model.bin": b"older", **users}.items():
        api.upload_file(path_or_fileobj=data, path_in_repo=path, repo_id=repo_id)
    commits = len(api.list_repo_commits(repo_id))

    sharded = _push(hub, tmp_path, repo_id, SHARDED)
    assert set(api.list_repo_files(repo_id, revision=sharded)) == {".gitattributes", *SHARDED, *users}
    assert len(api.list_repo_commits(repo_id)) == commits + 1, "uploads and deletions are one commit"

    single = _push(hub, tmp_path, repo_id, {"config.json": b"{}", "model.safetensors": b"new single file"})
    files = set(api.list_repo_files(repo_id, revision=single))
    assert files == {".gitattributes", "config.json", "model.safetensors", *users}


@pytest.mark.parametrize("public", [True, False])
def test_private_true_warns_when_the_existing_repo_is_public_and_still_pushes(
    hub: LocalHub, tmp_path: Path, capsys: pytest.CaptureFixture[str], public: bool
) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    repo_id = api.create_repo(f"tester/visibility-{public}".lower(), private=not public).repo_id
    commit = _push(hub, tmp_path, repo_id, {"config.json": b"{}"}, private=True)
    warned = "dpo-trainer: warning: output.hub.private is true but" in capsys.readouterr().err
    assert warned is public
    info = api.model_info(repo_id)
    assert info.sha == commit and info.private is not public, "pushed; the visibility is left as it was"
