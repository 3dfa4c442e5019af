"""The local Hub driven by the real huggingface_hub client and by `datasets`, the way training jobs use the Hub."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from safetensors.numpy import load_file, save_file

from dpo_dev.hub import LocalHub, RefusalAccounts

from .conftest import HUB_TOKEN, HUB_USER

COMMIT_URL = re.compile(r"/commit/[0-9a-f]{40}$")


def _credentials(hub: LocalHub) -> tuple[str, str]:
    """The (token, user) the local_hub fixture configured."""
    return next(iter(hub.tokens.items()))


def _model_folder(root: Path) -> Path:
    """A small model checkpoint: binary weights (LFS) next to text files (plain git), one in a subfolder."""
    root.mkdir()
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, dtype=np.float32)}
    save_file(weights, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("a\nb\nc\n")
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_create_repo_private_and_exist_ok(local_hub: LocalHub) -> None:
    token, user = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    url = api.create_repo("policy", private=True)
    assert url == f"{local_hub.url}/{user}/policy"
    assert url.repo_id == f"{user}/policy"

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("policy")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("policy", exist_ok=True, private=True) == url

    info = api.model_info(f"{user}/policy")
    assert info.private is True
    assert [s.rfilename for s in info.siblings or []] == [".gitattributes"]
    assert re.fullmatch(r"[0-9a-f]{40}", info.sha or "")
    # Private repos look missing to anonymous callers, as on huggingface.co.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=local_hub.url, token=False).model_info(f"{user}/policy")
    assert api.whoami()["name"] == user


def test_model_push_round_trips_byte_identical(local_hub: LocalHub, tmp_path: Path) -> None:
    token, _ = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    repo_id = api.create_repo("policy", private=True).repo_id
    folder = _model_folder(tmp_path / "checkpoint")

    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload policy")
    assert commit.commit_url.startswith(f"{local_hub.url}/{repo_id}/commit/")
    assert COMMIT_URL.search(commit.commit_url)
    assert api.model_info(repo_id).sha == commit.oid

    tree = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "blob_id")}
    assert sorted(tree) == [".gitattributes", "config.json", "model.safetensors", "tokenizer/vocab.txt"]
    weights = (folder / "model.safetensors").read_bytes()
    lfs = tree["model.safetensors"].lfs
    assert lfs is not None and lfs.size == len(weights)
    assert tree["config.json"].lfs is None

    snapshot = Path(snapshot_download(repo_id, endpoint=local_hub.url, token=token))
    downloaded = _files(snapshot)
    assert downloaded.pop(".gitattributes")
    assert downloaded == _files(folder)
    single = hf_hub_download(repo_id, "model.safetensors", endpoint=local_hub.url, token=token, force_download=True)
    assert Path(single).read_bytes() == weights
    np.testing.assert_array_equal(load_file(single)["w"], np.arange(12, dtype=np.float32).reshape(3, 4))

    # HfFileSystem (what datasets uses) reads with HTTP range requests.
    fs = HfFileSystem(endpoint=local_hub.url, token=token)
    with fs.open(f"{repo_id}/model.safetensors", "rb", block_size=16) as handle:
        handle.seek(8)
        assert handle.read(40) == weights[8:48]


def test_branch_push_and_deletions(local_hub: LocalHub, tmp_path: Path) -> None:
    token, _ = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    repo_id = api.create_repo("policy").repo_id
    folder = _model_folder(tmp_path / "checkpoint")
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1")

    api.create_branch(repo_id, branch="candidate")
    api.create_branch(repo_id, branch="candidate", exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    (folder / "tokenizer" / "vocab.txt").unlink()
    on_branch = api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision="candidate", commit_message="v2", delete_patterns="*.txt"
    )
    assert COMMIT_URL.search(on_branch.commit_url) and on_branch.oid != first.oid

    assert "tokenizer/vocab.txt" in api.list_repo_files(repo_id)
    assert "tokenizer/vocab.txt" not in api.list_repo_files(repo_id, revision="candidate")
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id).branches}
    assert refs == {"main": first.oid, "candidate": on_branch.oid}
    assert [c.title for c in api.list_repo_commits(repo_id, revision="candidate")] == ["v2", "v1", "initial commit"]
    config = hf_hub_download(repo_id, "config.json", revision="candidate", endpoint=local_hub.url, token=token)
    assert json.loads(Path(config).read_text())["hidden_size"] == 128
    # The unchanged weights were not uploaded again: same LFS object on both branches.
    main_info = api.get_paths_info(repo_id, ["model.safetensors"])[0]
    branch_info = api.get_paths_info(repo_id, ["model.safetensors"], revision="candidate")[0]
    assert main_info.blob_id == branch_info.blob_id

    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo_id, revision="no-such-branch")


def test_tags_pin_a_commit(local_hub: LocalHub, tmp_path: Path) -> None:
    """A tag names one commit for good: it stays when its branch moves on, and it cannot be committed to."""
    token, _ = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    repo_id = api.create_repo("policy").repo_id
    folder = _model_folder(tmp_path / "checkpoint")
    first = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v1")
    api.create_tag(repo_id, tag="run-g1", revision=first.oid)
    with pytest.raises(HfHubHTTPError) as taken:
        api.create_tag(repo_id, tag="run-g1")
    assert taken.value.response.status_code == 409
    api.create_tag(repo_id, tag="run-g1", exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="v2")

    assert {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags} == {"run-g1": first.oid}
    assert api.model_info(repo_id, revision="run-g1").sha == first.oid
    config = hf_hub_download(repo_id, "config.json", revision="run-g1", endpoint=local_hub.url, token=token)
    assert json.loads(Path(config).read_text())["hidden_size"] == 64
    with pytest.raises(HfHubHTTPError, match="not a branch"):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="run-g1")
    api.delete_tag(repo_id, tag="run-g1")
    assert api.list_repo_refs(repo_id).tags == []


def test_bad_or_missing_token_is_an_auth_error(local_hub: LocalHub) -> None:
    """huggingface_hub has no 401 subclass: it raises HfHubHTTPError itself, carrying the 401 response."""
    with pytest.raises(HfHubHTTPError) as bad:
        HfApi(endpoint=local_hub.url, token="hf_wrong").create_repo("policy")
    assert type(bad.value) is HfHubHTTPError
    assert bad.value.response.status_code == 401
    assert "Invalid credentials" in str(bad.value)
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(endpoint=local_hub.url, token="hf_wrong").whoami()

    repo_id = HfApi(endpoint=local_hub.url, token=_credentials(local_hub)[0]).create_repo("policy").repo_id
    anonymous = HfApi(endpoint=local_hub.url, token=False)
    with pytest.raises(HfHubHTTPError) as missing:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert missing.value.response.status_code == 401
    assert anonymous.list_repo_files(repo_id) == [".gitattributes"]  # public: readable without a token


def test_load_dataset_from_hub(local_hub: LocalHub, tmp_path: Path) -> None:
    token, _ = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    repo_id = api.create_repo("prefs", repo_type="dataset", private=True).repo_id
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    data = tmp_path / "data"
    (data / "dpo").mkdir(parents=True)
    (data / "dpo" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "sft").mkdir()
    (data / "sft" / "train.jsonl").write_text(json.dumps({"text": "other split"}) + "\n")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=data, commit_message="data")

    # datasets reads HF_ENDPOINT when imported: a fresh interpreter gets a clean, explicit environment.
    script = (
        "import json, datasets\n"
        f"ds = datasets.load_dataset({repo_id!r}, data_dir='dpo', split='train')\n"
        "print(json.dumps(ds.to_list()))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": local_hub.url,
        "HF_TOKEN": token,
        "HF_HOME": str(tmp_path / "hf-home-datasets"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == rows


@pytest.mark.usefixtures("hub_client_env")
def test_standalone_server_cli(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dpo_dev.hub", "--root", str(tmp_path), "--port", "0", "--token", "t0k"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = process.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:")
        assert HfApi(endpoint=url, token="t0k").whoami()["name"] == "local"
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


def test_the_request_log_shows_a_cached_file_is_not_fetched_again(local_hub: LocalHub, tmp_path: Path) -> None:
    token, _ = _credentials(local_hub)
    api = HfApi(endpoint=local_hub.url, token=token)
    repo_id = api.create_repo("policy").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=_model_folder(tmp_path / "checkpoint"))
    cache = tmp_path / "cache"
    resolve = f"/{repo_id}/resolve/main/model.safetensors"

    def download() -> list[tuple[str, int]]:
        start = len(local_hub.requests)
        hf_hub_download(repo_id, "model.safetensors", endpoint=local_hub.url, token=token, cache_dir=cache)
        return [(r.method, r.status) for r in local_hub.requests[start:] if r.path == resolve]

    assert ("GET", 200) in download()
    assert download() == [("HEAD", 200)], "a cached file: only its metadata is asked for"


ACCOUNTS = RefusalAccounts(HUB_USER, HUB_TOKEN)
READER, OUTSIDER, BOB, SCOPED = ACCOUNTS.read, ACCOUNTS.outsider, ACCOUNTS.bob, ACCOUNTS.scoped


@pytest.fixture
def org_hub(tmp_path: Path, hub_client_env: None) -> Iterator[LocalHub]:
    """RefusalAccounts: tester's tokens, alice and bob, the organization acme."""
    with LocalHub(tmp_path / "hub-root", ACCOUNTS.tokens(), orgs=ACCOUNTS.orgs()) as hub:
        yield hub


def _refused(call: Callable[[], object], status: int = 403) -> HfHubHTTPError:
    with pytest.raises(HfHubHTTPError) as refused:
        call()
    assert refused.value.response.status_code == status, refused.value
    return refused.value


def test_writing_into_a_namespace_needs_a_write_token_of_its_user_or_a_writing_member(org_hub: LocalHub) -> None:
    """As on huggingface.co: 403 (huggingface_hub's plain HfHubHTTPError, the server's reason in its message) for
    a read token, a user writing into someone else's namespace, a read member of an organization, a fine-grained
    token without repo.write there; creating is refused before the repo's existence is told (no 409)."""
    api = {token: HfApi(endpoint=org_hub.url, token=token) for token in (HUB_TOKEN, READER, OUTSIDER, BOB, SCOPED)}
    own = api[HUB_TOKEN].create_repo("tester/own").repo_id
    org = api[HUB_TOKEN].create_repo("acme/shared").repo_id
    api[HUB_TOKEN].create_repo("acme/scoped")

    error = _refused(lambda: api[OUTSIDER].create_repo(own))
    assert type(error) is HfHubHTTPError and 'rights to create a model under the namespace "tester"' in str(error)
    _refused(lambda: api[OUTSIDER].create_repo("acme/new"))
    _refused(lambda: api[BOB].create_repo("acme/new"))
    assert "read token" in str(_refused(lambda: api[READER].create_repo("tester/new")))
    for token in (READER, OUTSIDER):
        _refused(lambda t=token: api[t].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=own))
        _refused(lambda t=token: api[t].create_branch(own, branch="b"))
        _refused(lambda t=token: api[t].create_tag(own, tag="v1"))
    _refused(lambda: api[BOB].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=org))
    _refused(lambda: api[SCOPED].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=org))
    api[SCOPED].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="acme/scoped")
    api[HUB_TOKEN].upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=org)
    assert api[OUTSIDER].list_repo_files(own) == [".gitattributes"], "public: anyone reads it"
    with pytest.raises(RepositoryNotFoundError):
        api[OUTSIDER].auth_check("tester/missing")
    _refused(lambda: api[OUTSIDER].auth_check(own, write=True))
    api[HUB_TOKEN].auth_check(org, write=True)


def test_private_repos_are_invisible_outside_their_namespace(org_hub: LocalHub) -> None:
    owner, member = HfApi(endpoint=org_hub.url, token=HUB_TOKEN), HfApi(endpoint=org_hub.url, token=BOB)
    own = owner.create_repo("tester/secret", private=True).repo_id
    org = owner.create_repo("acme/secret", private=True, repo_type="dataset").repo_id
    assert member.dataset_info(org).private is True, "any member of the organization sees its private repos"
    for caller, repo_id, kind in ((OUTSIDER, own, "model"), (BOB, own, "model"), (OUTSIDER, org, "dataset")):
        with pytest.raises(RepositoryNotFoundError) as hidden:
            HfApi(endpoint=org_hub.url, token=caller).repo_info(repo_id, repo_type=kind)
        assert hidden.value.response.status_code == 404
        with pytest.raises(RepositoryNotFoundError):  # not a 403: writing does not reveal it either
            HfApi(endpoint=org_hub.url, token=caller).create_tag(repo_id, tag="v1", repo_type=kind)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=org_hub.url, token=False).model_info(own)


def test_a_gated_repos_files_answer_gated_repo_error_until_access_is_granted(org_hub: LocalHub, tmp_path: Path) -> None:
    owner, outsider = HfApi(endpoint=org_hub.url, token=HUB_TOKEN), HfApi(endpoint=org_hub.url, token=OUTSIDER)
    repo_id = owner.create_repo("tester/gated").repo_id
    owner.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    owner.update_repo_settings(repo_id, gated="auto")
    assert outsider.model_info(repo_id).gated == "auto", "the repo's page is public"
    for api in (outsider, HfApi(endpoint=org_hub.url, token=False)):
        with pytest.raises(GatedRepoError):
            api.hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "refused")
        with pytest.raises(GatedRepoError):
            api.auth_check(repo_id)
    owner.hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "owner")
    owner.grant_access(repo_id, "alice")
    outsider.auth_check(repo_id)
    assert Path(outsider.hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "granted")).read_bytes() == b"{}"


def test_whoami_reports_the_user_its_organizations_and_the_tokens_role(org_hub: LocalHub) -> None:
    def whoami(token: str) -> dict:
        return HfApi(endpoint=org_hub.url, token=token).whoami()

    tester = whoami(HUB_TOKEN)
    assert tester["name"] == HUB_USER and tester["type"] == "user"
    assert [(o["name"], o["roleInOrg"], o["type"]) for o in tester["orgs"]] == [("acme", "write", "org")]
    assert tester["auth"]["accessToken"]["role"] == "write"
    assert whoami(READER)["auth"]["accessToken"]["role"] == "read"
    assert whoami(OUTSIDER)["orgs"] == [] and whoami(BOB)["orgs"][0]["roleInOrg"] == "read"
    fine = whoami(SCOPED)["auth"]["accessToken"]
    assert fine["role"] == "fineGrained"
    (scope,) = fine["fineGrained"]["scoped"]
    assert scope["entity"]["type"] == "model" and scope["entity"]["name"] == "acme/scoped"
    assert scope["permissions"] == ["repo.write"]
