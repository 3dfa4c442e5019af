"""The push stage against the local Hub: what arrives, and how a bad token fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_dev.hub import LocalHub
from dpo_trainer.errors import HubError
from dpo_trainer.hub import tag_commit
from dpo_trainer.layout import CARD_FILE, PLOT_FILE

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
