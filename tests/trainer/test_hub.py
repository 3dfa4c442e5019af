"""The push stage against the local Hub: what arrives, what it replaces, when it warns, how a bad token fails."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpo_dev.hub import LocalHub, RefusalAccounts
from dpo_trainer.context import RunContext, RunState
from dpo_trainer.errors import DatasetError, HubError, HubReadDenied, HubWriteDenied, RunRevisionTaken
from dpo_trainer.hub import check_sources, check_token, tag_commit
from dpo_trainer.hub import run as push_stage
from dpo_trainer.layout import CARD_FILE, PLOT_FILE, RunLayout
from dpo_trainer.progress import Reporter
from dpojob_api.spec import DPOJobSpec

from .conftest import (
    HUB_TOKEN,
    HUB_USER,
    PUSH_BRANCH,
    PUSH_REPO,
    TINY_MODEL,
    CliRun,
    assert_failed,
    hub_env,
    quickstart_job,
    run_cli,
)


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


ACCOUNTS = RefusalAccounts(HUB_USER, HUB_TOKEN)
READER, OUTSIDER, BOB, SCOPED = ACCOUNTS.read, ACCOUNTS.outsider, ACCOUNTS.bob, ACCOUNTS.scoped


@pytest.fixture(scope="module")
def guarded_hub(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A Hub with the refusals a user meets (the session `hub` set the client up): RefusalAccounts."""
    root = tmp_path_factory.mktemp("guarded-hub")
    with LocalHub(root, ACCOUNTS.tokens(), orgs=ACCOUNTS.orgs()) as guarded:
        yield guarded


def _context(tmp_path: Path, token: str | None, generation: int = 1, **spec: object) -> RunContext:
    layout = RunLayout(tmp_path / "run")
    document = quickstart_job(**spec)["spec"]
    metadata = {"name": "m", "generation": generation}
    return RunContext(
        DPOJobSpec.model_validate(document), layout, Reporter(io.StringIO()), token, RunState(layout.state), metadata
    )


@pytest.fixture
def on_guarded_hub(guarded_hub: LocalHub) -> Iterator[LocalHub]:
    """This process's huggingface_hub pointed at the guarded Hub."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "ENDPOINT", guarded_hub.url)
        yield guarded_hub


@pytest.mark.parametrize(
    ("token", "repo_id", "refusal"),
    [
        (READER, "tester/m", "HF_TOKEN is a read token of tester"),
        (OUTSIDER, "tester/m", "belongs to alice, who is neither tester nor a member of the organization tester"),
        (BOB, "acme/m", "bob is a read member of the organization acme: pushing needs the write or admin role"),
        (SCOPED, "tester/m", "fine-grained token of tester without write access (repo.write) to tester"),
        (HUB_TOKEN, "tester/m", None),
        (HUB_TOKEN, "acme/m", None),
        (SCOPED, "acme/scoped", None),
    ],
)
def test_the_token_must_be_able_to_write_the_target_namespace(
    on_guarded_hub: LocalHub, tmp_path: Path, token: str, repo_id: str, refusal: str | None
) -> None:
    ctx = _context(tmp_path, token, output={"hub": {"repoId": repo_id}})
    if refusal is None:
        check_token(ctx)
        return
    with pytest.raises(HubWriteDenied) as denied:
        check_token(ctx)
    assert str(denied.value).startswith(f"spec.output.hub.repoId {repo_id!r}: ") and refusal in str(denied.value)


def test_an_existing_repo_the_hub_refuses_to_this_token_is_refused_before_training(
    on_guarded_hub: LocalHub, tmp_path: Path
) -> None:
    """whoami says acme is writable, the Hub's auth-check of the repo itself says no (a fine-grained token scoped
    to one repo of the organization)."""
    from huggingface_hub import HfApi

    HfApi(token=HUB_TOKEN).create_repo("acme/other", exist_ok=True)
    ctx = _context(tmp_path, SCOPED, output={"hub": {"repoId": "acme/other"}})
    with pytest.raises(HubWriteDenied, match="'acme/other'"):
        check_token(ctx)


def test_a_read_token_fails_the_run_in_seconds_before_anything_is_downloaded(
    guarded_hub: LocalHub, tmp_path: Path
) -> None:
    started = time.monotonic()
    run = run_cli(
        quickstart_job(output={"hub": {"repoId": "tester/never"}}), tmp_path, env=hub_env(guarded_hub, READER)
    )
    assert_failed(run, "HubWriteDenied", "spec.output.hub.repoId 'tester/never'", "read token")
    assert not [e for e in run.events if e["event"] == "stage_start"]
    assert READER not in run.stdout + run.stderr
    assert time.monotonic() - started < 60


def test_the_runs_tag_of_another_run_fails_before_training_and_its_own_tag_is_a_resume(
    on_guarded_hub: LocalHub, tmp_path: Path
) -> None:
    """A DPOJob deleted and recreated under the same name starts again at generation 1: run-g1 of the target names
    the earlier DPOJob's commit, and the push would fail at the tag after the whole training. A tag on the commit
    this run's work directory recorded (a pod stopped after tagging) is this run's own."""
    from huggingface_hub import HfApi

    api = HfApi(token=HUB_TOKEN)
    repo_id = api.create_repo("tester/replaced", exist_ok=True).repo_id
    earlier = api.upload_file(path_or_fileobj=b"earlier", path_in_repo="a.txt", repo_id=repo_id).oid
    api.create_tag(repo_id, tag="run-g1", revision=earlier)
    ctx = _context(tmp_path, HUB_TOKEN, output={"hub": {"repoId": repo_id}})
    with pytest.raises(RunRevisionTaken) as taken:
        check_token(ctx)
    assert f"the tag run-g1 of {repo_id} already names commit {earlier}, which this run did not push" in str(
        taken.value
    )
    assert "spec.output.hub.runRevision: none" in str(taken.value)
    check_token(_context(tmp_path, HUB_TOKEN, generation=2, output={"hub": {"repoId": repo_id}}))
    check_token(_context(tmp_path, HUB_TOKEN, output={"hub": {"repoId": repo_id, "runRevision": "none"}}))
    ctx.write_json(ctx.layout.push_result, {"repoId": repo_id, "commitSha": earlier})
    check_token(ctx)

    branch = _context(tmp_path / "branch", HUB_TOKEN, output={"hub": {"repoId": repo_id, "runRevision": "branch"}})
    api.create_branch(repo_id, branch="run-g1")
    check_token(branch)  # created, nothing pushed on it yet: a pod stopped before its upload
    api.upload_file(path_or_fileobj=b"other", path_in_repo="a.txt", repo_id=repo_id, revision="run-g1")
    with pytest.raises(RunRevisionTaken, match="the branch run-g1"):
        check_token(branch)


def test_a_tag_clash_fails_the_run_in_seconds(guarded_hub: LocalHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=guarded_hub.url, token=HUB_TOKEN)
    repo_id = api.create_repo("tester/gitops-replaced", exist_ok=True).repo_id
    api.create_tag(repo_id, tag="run-g1")
    job = quickstart_job(output={"hub": {"repoId": repo_id}})
    job["metadata"]["generation"] = 1
    run = run_cli(job, tmp_path, env=hub_env(guarded_hub))
    assert_failed(run, "RunRevisionTaken", "the tag run-g1 of tester/gitops-replaced")
    assert not [e for e in run.events if e["event"] == "stage_start"]


def test_a_gated_or_private_source_the_token_cannot_read_fails_naming_its_field(
    on_guarded_hub: LocalHub, tmp_path: Path
) -> None:
    from huggingface_hub import HfApi

    alice = HfApi(token=OUTSIDER)
    model = alice.create_repo("alice/gated-llama", exist_ok=True).repo_id
    alice.upload_file(
        path_or_fileobj=(TINY_MODEL / "config.json").read_bytes(), path_in_repo="config.json", repo_id=model
    )
    alice.update_repo_settings(model, gated="manual")
    dataset = alice.create_repo("alice/pairs", repo_type="dataset", private=True, exist_ok=True).repo_id
    gated_model = DPOJobSpec.model_validate(quickstart_job(model={"name": model})["spec"])
    with pytest.raises(HubReadDenied) as denied:
        check_sources(gated_model, HUB_TOKEN)
    assert str(denied.value).startswith(f"spec.model.name {model!r} is a gated model and HF_TOKEN's user was not")
    assert "request access" in str(denied.value)
    job = quickstart_job()
    job["spec"]["data"]["dpo"]["source"] = {"hub": {"name": dataset}}
    with pytest.raises(DatasetError, match=f"spec.data.dpo.source.hub.name {dataset!r}: no such dataset .* private"):
        check_sources(DPOJobSpec.model_validate(job["spec"]), HUB_TOKEN)
    check_sources(DPOJobSpec.model_validate(job["spec"]), OUTSIDER)
    alice.grant_access(model, HUB_USER)
    check_sources(gated_model, HUB_TOKEN)


def test_a_gated_base_model_fails_the_run_in_seconds(guarded_hub: LocalHub, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    alice = HfApi(endpoint=guarded_hub.url, token=OUTSIDER)
    model = alice.create_repo("alice/gated-base", exist_ok=True).repo_id
    alice.update_repo_settings(model, gated="auto")
    run = run_cli(quickstart_job(model={"name": model}), tmp_path, env=hub_env(guarded_hub))
    assert_failed(run, "HubReadDenied", f"spec.model.name {model!r} is a gated model")
    assert not [e for e in run.events if e["event"] in ("stage_start", "preflight")], "not even config.json"
