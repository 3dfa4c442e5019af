"""The `push` stage, a pre-flight token check so a bad token fails before hours of training, and reading the
card of the model a push would replace.

huggingface_hub reads HF_ENDPOINT when it is imported, so a private Hub (or the tests' local one) is
chosen by the environment, never by the spec.

Each run gets a revision users can pin (output.hub.runRevision): the tag `run-g<generation>` on its commit
(tag, the default), or the branch `run-g<generation>` started from output.hub.revision, which then stays as it
was (branch). The generation is metadata.generation of the DPOJob document: the operator writes the run's.

The push replaces the model, not the repo: the commit that uploads DIR/model also deletes the target's other
weight files (WEIGHT_FILES), so a model sharded now does not sit beside the single file of an earlier push (or
the reverse) for loaders to pick up; whatever else users keep in the repo stays.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpo_trainer.context import RunContext
from dpo_trainer.errors import HubAuthError, HubError, classify, reraise
from dpo_trainer.layout import CARD_FILE

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from dpojob_api.spec import HubOutput

WEIGHT_FILES = (
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model-*-of-*.bin",
    "pytorch_model.bin.index.json",
)
"""The weight files transformers writes and loads (single file, shards, shard index), as upload_folder's
delete_patterns: those of the target the push does not replace are deleted in its commit."""


def check_token(ctx: RunContext) -> None:
    """Pushing needs a token the Hub accepts; checked up front. A server without whoami is not an error."""
    hub = ctx.spec.output.hub
    if hub is None:
        return
    if not ctx.token:
        raise HubAuthError(f"output.hub.repoId {hub.repo_id!r} is set but HF_TOKEN is empty: a push needs a token")
    from huggingface_hub import HfApi

    try:
        info = HfApi(token=ctx.token).whoami()
    except Exception as exc:
        error = classify(exc, HubError, "checking HF_TOKEN with the Hub")
        if isinstance(error, HubAuthError):
            raise error from exc
        return
    if info.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubAuthError(f"HF_TOKEN is a read-only token: it cannot push to {hub.repo_id!r}")


def target_card(ctx: RunContext) -> tuple[str | None, str | None]:
    """(commit, README.md text) at output.hub.revision: (None, None) while nothing is there (no repo or branch yet),
    (commit, None) when that commit has no card."""
    hub = ctx.spec.output.hub
    assert hub is not None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(token=ctx.token)
    revision = hub.revision or "main"
    context = f"reading the model card at {hub.repo_id}@{revision}"
    try:
        sha = api.model_info(hub.repo_id, revision=revision).sha
    except GatedRepoError as exc:
        reraise(exc, HubError, context)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return None, None
    except Exception as exc:
        reraise(exc, HubError, context)
    try:
        path = api.hf_hub_download(hub.repo_id, CARD_FILE, revision=sha)
    except EntryNotFoundError:
        return sha, None
    except Exception as exc:
        reraise(exc, HubError, context)
    return sha, Path(path).read_text(encoding="utf-8")


def run_ref(ctx: RunContext) -> str | None:
    """The run's own tag or branch name, run-g<generation>; None with runRevision none or no generation known."""
    hub = ctx.spec.output.hub
    assert hub is not None
    if hub.run_revision == "none":
        return None
    generation = ctx.metadata.get("generation")
    if generation is None:
        print(
            f"dpo-trainer: note: output.hub.runRevision is {hub.run_revision} but the DPOJob has no "
            "metadata.generation: no per-run revision",
            file=sys.stderr,
            flush=True,
        )
        return None
    return f"run-g{generation}"


def tag_commit(api: HfApi, repo_id: str, name: str, commit: str, commit_url: str) -> None:
    """Tag the commit; a retried push finds its own tag there already, another run's tag of that name is an error."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        api.create_tag(repo_id, tag=name, revision=commit, repo_type="model")
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise
        existing = next((t.target_commit for t in api.list_repo_refs(repo_id).tags if t.name == name), None)
        if existing != commit:
            raise HubError(
                f"tag {name} of {repo_id} already names commit {existing} (an earlier DPOJob of the same name?): "
                f"the model is pushed as {commit_url} but not tagged; delete that tag or set output.hub.runRevision"
            ) from None


def warn_if_public(api: HfApi, hub: HubOutput) -> None:
    """output.hub.private applies when the push creates the repo; an existing public repo stays public (its
    visibility is its owner's to change), so say so on stderr rather than publish the model without a word."""
    if hub.private and api.model_info(hub.repo_id).private is False:
        print(
            f"dpo-trainer: warning: output.hub.private is true but {hub.repo_id} already exists and is public: "
            "the model is pushed there publicly; make the repo private on the Hub, or set private: false",
            file=sys.stderr,
            flush=True,
        )


def run(ctx: RunContext) -> None:
    """create_repo(exist_ok) → create_branch (revision; the run's branch) → upload_folder(DIR/model, deleting
    stale weight files) → create_tag."""
    hub = ctx.spec.output.hub
    assert hub is not None
    from huggingface_hub import HfApi

    api = HfApi(token=ctx.token)
    ref = run_ref(ctx)
    tag = ref if hub.run_revision == "tag" else None
    branch = (ref if hub.run_revision == "branch" else None) or hub.revision
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        warn_if_public(api, hub)
        if hub.revision:
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
        if branch is not None and branch != hub.revision:
            api.create_branch(hub.repo_id, branch=branch, revision=hub.revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=hub.repo_id,
            folder_path=str(ctx.layout.model),
            revision=branch,
            commit_message=hub.commit_message,
            repo_type="model",
            delete_patterns=list(WEIGHT_FILES),
        )
        if tag:
            tag_commit(api, hub.repo_id, tag, commit.oid, commit.commit_url)
    except Exception as exc:
        reraise(exc, HubError, f"pushing to {hub.repo_id}")
    result: dict[str, Any] = {
        "repoId": hub.repo_id,
        "revision": branch or "main",
        "commitUrl": commit.commit_url,
        "commitSha": commit.oid,
    }
    if tag:
        result["tag"] = tag
    ctx.write_json(ctx.layout.push_result, result)
