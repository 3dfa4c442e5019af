"""The `push` stage, and a pre-flight token check so a bad token fails before hours of training.

huggingface_hub reads HF_ENDPOINT when it is imported, so a private Hub (or the tests' local one) is
chosen by the environment, never by the spec.
"""

from __future__ import annotations

from typing import Any

from dpo_trainer.context import RunContext
from dpo_trainer.errors import HubAuthError, HubError, classify, reraise

RESULT = "result.json"


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


def run(ctx: RunContext) -> None:
    """create_repo(exist_ok) → create_branch (when a revision is set) → upload_folder(DIR/model)."""
    hub = ctx.spec.output.hub
    assert hub is not None
    from huggingface_hub import HfApi

    api = HfApi(token=ctx.token)
    try:
        api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        if hub.revision:
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=hub.repo_id,
            folder_path=str(ctx.out_dir / "model"),
            revision=hub.revision,
            commit_message=hub.commit_message,
            repo_type="model",
        )
    except Exception as exc:
        reraise(exc, HubError, f"pushing to {hub.repo_id}")
    result: dict[str, Any] = {
        "repoId": hub.repo_id,
        "revision": hub.revision or "main",
        "commitUrl": commit.commit_url,
        "commitSha": commit.oid,
    }
    ctx.write_json("push", RESULT, result)
