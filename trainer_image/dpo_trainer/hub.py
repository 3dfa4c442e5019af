"""The `push` stage, the preflight Hub checks so a push that cannot succeed fails before hours of training, and
reading the card of the model a push would replace.

Preflight (before any download): every Hub repo the run reads (the base model, each dataset) is readable with the
token (`check_sources`: a gated repo not granted is HubReadDenied); and with output.hub, `check_token`: the token
is valid (HubAuthError), may write into the target's namespace — whoami's role, user, organizations (roleInOrg)
and fine-grained scopes, then the Hub's own auth-check of an existing repo (HubWriteDenied) — and the run's tag or
branch is free or this run's own (RunRevisionTaken).

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
from dpo_trainer.errors import (
    DatasetError,
    HubAuthError,
    HubError,
    HubReadDenied,
    HubWriteDenied,
    ModelLoadError,
    RunRevisionTaken,
    classify,
    reraise,
)
from dpo_trainer.layout import CARD_FILE
from dpo_trainer.specfile import looks_like_path

if TYPE_CHECKING:
    from huggingface_hub import HfApi

    from dpojob_api.spec import DPOJobSpec, HubOutput

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


ORG_WRITE_ROLES = frozenset({"write", "admin", "contributor"})
"""Organization roles that may create repos in it (a contributor: its own repos; the Hub's auth-check of an existing
repo says the rest)."""


def check_token(ctx: RunContext) -> None:
    """Pushing needs a token the Hub accepts that may write the target; checked up front. A server without whoami is
    not an error."""
    hub = ctx.spec.output.hub
    if hub is None:
        return
    if not ctx.token:
        raise HubAuthError(f"output.hub.repoId {hub.repo_id!r} is set but HF_TOKEN is empty: a push needs a token")
    from huggingface_hub import HfApi

    api = HfApi(token=ctx.token)
    try:
        info = api.whoami()
    except Exception as exc:
        error = classify(exc, HubError, "checking HF_TOKEN with the Hub")
        if isinstance(error, HubAuthError):
            raise error from exc
        return
    refusal = write_refusal(info, hub.repo_id)
    if refusal:
        raise HubWriteDenied(f"spec.output.hub.repoId {hub.repo_id!r}: {refusal}")
    if _may_write_existing(api, hub.repo_id):
        check_run_revision(ctx, api)


def write_refusal(whoami: dict[str, Any], repo_id: str) -> str | None:
    """Why whoami's token may not write into repo_id's namespace, or None: its role (read; fineGrained without
    repo.write on the namespace or the repo), and the namespace (the user's own, or an organization where the user
    has a writing role)."""
    namespace = repo_id.split("/")[0]
    user = whoami.get("name")
    access = (whoami.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        return f"HF_TOKEN is a read token of {user}: a push needs a write token"
    if namespace != user:
        orgs = {org.get("name"): org.get("roleInOrg") for org in whoami.get("orgs") or []}
        if namespace not in orgs:
            member_of = ", ".join(sorted(filter(None, orgs))) or "none"
            return (
                f"HF_TOKEN belongs to {user}, who is neither {namespace} nor a member of the organization {namespace} "
                f"(member of: {member_of}); use a token of a user who may write there, or a repoId under {user}/"
            )
        if orgs[namespace] is not None and orgs[namespace] not in ORG_WRITE_ROLES:
            return (
                f"HF_TOKEN's user {user} is a {orgs[namespace]} member of the organization {namespace}: pushing needs "
                "the write or admin role there"
            )
    if role == "fineGrained":
        scoped = ((access.get("fineGrained") or {}).get("scoped")) or []
        if not any(
            (entry.get("entity") or {}).get("name") in (namespace, repo_id)
            and "repo.write" in entry.get("permissions", [])
            for entry in scoped
        ):
            return (
                f"HF_TOKEN is a fine-grained token of {user} without write access (repo.write) to {namespace} or "
                f"{repo_id}: add it to the token's permissions, or use a write token"
            )
    return None


def _may_write_existing(api: HfApi, repo_id: str) -> bool:
    """The Hub's own verdict on an existing repo (auth-check/write): True when it exists and may be written, False
    when it does not exist yet (the push creates it) or the Hub cannot say; HubWriteDenied when refused."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        api.auth_check(repo_id, write=True)
    except RepositoryNotFoundError:
        return False
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 403:
            raise HubWriteDenied(
                f"spec.output.hub.repoId {repo_id!r}: the Hub refuses HF_TOKEN write access to this repo (HTTP 403); "
                "use a token of a user who may write it, or another repoId"
            ) from None
        return False
    except Exception:
        return False
    return True


def check_run_revision(ctx: RunContext, api: HfApi) -> None:
    """The run's tag or branch (run_ref) must be free, or name what this run pushed (its work directory's record:
    a resumed push), or, a branch, still be where it started (nothing pushed on it yet). Otherwise another run
    pushed there — a DPOJob deleted and recreated under the same name starts again at generation 1 — and the push
    would fail at the tag (or mix two runs on one branch) after all the training."""
    hub = ctx.spec.output.hub
    assert hub is not None
    ref = run_ref(ctx)
    if ref is None:
        return
    try:
        refs = api.list_repo_refs(hub.repo_id)
    except Exception:
        return  # the push stage meets (and reports) whatever this was
    kind = "tag" if hub.run_revision == "tag" else "branch"
    found = {r.name: r.target_commit for r in (refs.tags if kind == "tag" else refs.branches)}.get(ref)
    if found is None:
        return
    pushed = ctx.read_json(ctx.layout.push_result) or {}
    if pushed.get("repoId") == hub.repo_id and pushed.get("commitSha") == found:
        return
    if kind == "branch":
        start = {r.name: r.target_commit for r in refs.branches}.get(hub.revision or "main")
        if found == start:
            return
    raise RunRevisionTaken(
        f"spec.output.hub.runRevision: the {kind} {ref} of {hub.repo_id} already names commit {found}, which this "
        "run did not push (an earlier DPOJob of the same name, deleted and recreated, starts again at generation "
        f"1?): delete that {kind} on the Hub, set spec.output.hub.runRevision: none, or push to another "
        "spec.output.hub.repoId"
    )


def check_sources(spec: DPOJobSpec, token: str | None) -> None:
    """Every Hub repo the run reads (spec.model.name, the datasets of spec.data) readable with the token, asked with
    the Hub's auth-check (no file is downloaded): a gated repo not granted is HubReadDenied, a repo that is missing
    or private to others is the stage's own reason (ModelLoadError, DatasetError). Skipped offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return
    repos: list[tuple[str, str, str, type[ModelLoadError | DatasetError]]] = []
    if not looks_like_path(spec.model.name):
        repos.append(("spec.model.name", spec.model.name, "model", ModelLoadError))
    for field, source in _hub_sources(spec):
        repos.append((field, source, "dataset", DatasetError))
    api = HfApi(token=token)
    for field, repo_id, kind, missing in repos:
        try:
            api.auth_check(repo_id, repo_type=kind)
        except GatedRepoError:
            who = "HF_TOKEN's user" if token else "an anonymous caller (HF_TOKEN is empty)"
            raise HubReadDenied(
                f"{field} {repo_id!r} is a gated {kind} and {who} was not granted access: request access on its Hub "
                "page with the token's user (and wait for the grant), or use a token of a user who has it"
            ) from None
        except RepositoryNotFoundError:
            raise missing(
                f"{field} {repo_id!r}: no such {kind} on the Hub, or it is private and "
                + ("HF_TOKEN's user may not read it" if token else "HF_TOKEN is empty")
                + ": check the id, or use a token of a user who may read it"
            ) from None
        except Exception as exc:
            error = classify(exc, HubError, f"checking access to {field} {repo_id!r}")
            if isinstance(error, HubAuthError):
                raise error from exc
            # anything else (network, a server without auth-check): the stage that downloads it says


def _hub_sources(spec: DPOJobSpec) -> list[tuple[str, str]]:
    """(field path, dataset id) of every Hub dataset the run reads."""
    found = []
    data = spec.data
    sections = [("data.dpo", data.dpo)] + ([("data.sft", data.sft)] if spec.sft.enabled else [])
    for prefix, section in sections:
        if section is None:
            continue
        for name in ("source", "eval_source"):
            source = getattr(section, name, None)
            if source is not None and source.hub is not None:
                camel = "evalSource" if name == "eval_source" else "source"
                found.append((f"spec.{prefix}.{camel}.hub.name", source.hub.name))
    return found


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
        result: dict[str, Any] = {
            "repoId": hub.repo_id,
            "revision": branch or "main",
            "commitUrl": commit.commit_url,
            "commitSha": commit.oid,
        }
        # Recorded before the tag: a pod stopped between the two finds its own commit under the tag when it resumes
        # (check_run_revision), not another run's.
        ctx.write_json(ctx.layout.push_result, result)
        if tag:
            tag_commit(api, hub.repo_id, tag, commit.oid, commit.commit_url)
    except Exception as exc:
        reraise(exc, HubError, f"pushing to {hub.repo_id}")
    if tag:
        result["tag"] = tag
        ctx.write_json(ctx.layout.push_result, result)
