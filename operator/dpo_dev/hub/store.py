"""The local Hub's state on disk: repos with branches, tags, PR refs and immutable commits (sha1 ids), and one
content-addressed object store (sha256) shared by regular and LFS files."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .gitattributes import DEFAULT_GITATTRIBUTES, _lfs_patterns

DEFAULT_BRANCH = "main"
# The Hub refuses regular (non-LFS) files above 10 MiB.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_BRANCH_RE = re.compile(r"^(?!refs/)(?!.*\.\.)(?!.*//)[A-Za-z0-9._-][A-Za-z0-9._/-]*(?<![/.])$")


class HubError(Exception):
    """An error answered the way huggingface.co does, so the client raises its matching exception.

    `code` goes to the ``X-Error-Code`` header (RepoNotFound, RevisionNotFound, EntryNotFound), which is what
    `huggingface_hub.utils.hf_raise_for_status` dispatches on; `body` adds fields to the JSON error body.
    """

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's ``oid`` and ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _regular_entry(data: bytes, sha256: str) -> dict[str, Any]:
    """A file stored in git: its oid is the blob's git id."""
    return {"sha256": sha256, "size": len(data), "lfs": False, "oid": _git_blob_oid(data)}


def _lfs_entry(sha256: str, size: int) -> dict[str, Any]:
    """A file stored in LFS: git holds a pointer, so its oid is the pointer's git id."""
    return {"sha256": sha256, "size": size, "lfs": True, "oid": _git_blob_oid(_lfs_pointer(sha256, size))}


def _pointer_size(entry: Mapping[str, Any]) -> int:
    return len(_lfs_pointer(entry["sha256"], entry["size"]))


def _check_repo_path(path: str) -> str:
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _parents(path: str) -> Iterator[str]:
    parts = path.split("/")
    for depth in range(1, len(parts)):
        yield "/".join(parts[:depth])


class _Store:
    """Repos, commits and objects on disk under `root`; one lock serialises every ref update."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- objects (content addressed by sha256) --
    def object_path(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self.object_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def _adopt(self, tmp_path: Path, sha256: str) -> None:
        target = self.object_path(sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(tmp_path, target)

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_object(sha256, len(data)):
            self.put_stream([data], sha256, len(data))
        return sha256

    def put_stream(self, chunks: Iterable[bytes], sha256: str, size: int) -> None:
        """Store an uploaded LFS object, refusing content whose sha256 or size differs from what was announced."""
        digest, received = hashlib.sha256(), 0
        fd, name = tempfile.mkstemp(dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    received += len(chunk)
                    if received > size:
                        break  # the rest is not read: the handler closes the connection
                    out.write(chunk)
            if received != size or digest.hexdigest() != sha256:
                expected, got = f"sha256 {sha256}, {size} bytes", f"sha256 {digest.hexdigest()}, {received} bytes"
                raise HubError(400, f"Uploaded content does not match: expected {expected}, got {got}")
            self._adopt(Path(name), sha256)
        finally:
            Path(name).unlink(missing_ok=True)

    # -- repos and refs --
    def _repo_dir(self, kind: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{kind}s" / repo_id

    def repo(self, kind: str, repo_id: str) -> dict[str, Any]:
        path = self._repo_dir(kind, repo_id) / "repo.json"
        if not path.is_file():
            raise HubError(404, f"Repository {kind}s/{repo_id} not found", "RepoNotFound")
        return json.loads(path.read_text())

    def _save_repo(self, kind: str, repo_id: str, data: dict[str, Any]) -> None:
        path = self._repo_dir(kind, repo_id) / "repo.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)

    def create_repo(self, kind: str, repo_id: str, private: bool) -> None:
        with self.lock:
            repo_dir = self._repo_dir(kind, repo_id)
            if (repo_dir / "repo.json").exists():
                raise HubError(409, f"You already created this {kind} repo")
            (repo_dir / "commits").mkdir(parents=True, exist_ok=True)
            data = DEFAULT_GITATTRIBUTES.encode()
            files = {".gitattributes": _regular_entry(data, self.put_bytes(data))}
            initial = self._write_commit(kind, repo_id, [], files, "initial commit", "", "system")
            self._save_repo(
                kind,
                repo_id,
                {"private": private, "createdAt": _now(), "branches": {DEFAULT_BRANCH: initial}, "pullRequests": {}},
            )

    def update_settings(self, kind: str, repo_id: str, *, gated: str | bool | None, private: bool | None) -> None:
        """Gate the repo's files (auto, manual; False lifts the gate) and/or change its visibility."""
        with self.lock:
            repo = self.repo(kind, repo_id)
            if gated is not None:
                repo["gated"] = gated
            if private is not None:
                repo["private"] = bool(private)
            self._save_repo(kind, repo_id, repo)

    def grant_access(self, kind: str, repo_id: str, user: str) -> None:
        """Let a user read a gated repo's files."""
        with self.lock:
            repo = self.repo(kind, repo_id)
            repo["grants"] = sorted({*repo.get("grants", ()), user})
            self._save_repo(kind, repo_id, repo)

    def delete_repo(self, kind: str, repo_id: str) -> None:
        with self.lock:
            self.repo(kind, repo_id)
            shutil.rmtree(self._repo_dir(kind, repo_id))

    def resolve(self, kind: str, repo_id: str, revision: str) -> str:
        """Commit id of a branch or tag name, ``refs/heads/x``, ``refs/tags/x``, ``refs/pr/N`` or a full commit id."""
        repo = self.repo(kind, repo_id)
        name = revision.removeprefix("refs/heads/")
        if name in repo["branches"]:
            return repo["branches"][name]
        tag = revision.removeprefix("refs/tags/")
        if tag in repo.get("tags", {}):
            return repo["tags"][tag]
        if (match := _PR_REF_RE.match(revision)) and match.group(1) in repo["pullRequests"]:
            return repo["pullRequests"][match.group(1)]
        if _COMMIT_RE.match(revision) and (self._repo_dir(kind, repo_id) / "commits" / f"{revision}.json").is_file():
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_branch(self, kind: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        with self.lock:
            repo = self.repo(kind, repo_id)
            if not _BRANCH_RE.match(branch) or _COMMIT_RE.match(branch):
                raise HubError(400, f"Invalid branch name: {branch!r}")
            if branch in repo["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo["branches"][branch] = self.resolve(kind, repo_id, starting_point or DEFAULT_BRANCH)
            self._save_repo(kind, repo_id, repo)

    def delete_branch(self, kind: str, repo_id: str, branch: str) -> None:
        with self.lock:
            repo = self.repo(kind, repo_id)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            if repo["branches"].pop(branch, None) is None:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            self._save_repo(kind, repo_id, repo)

    def create_tag(self, kind: str, repo_id: str, tag: str, revision: str) -> None:
        """Tags are immutable names of a commit: creating an existing one is a 409, as on huggingface.co."""
        with self.lock:
            repo = self.repo(kind, repo_id)
            if not _BRANCH_RE.match(tag) or _COMMIT_RE.match(tag):
                raise HubError(400, f"Invalid tag name: {tag!r}")
            tags = repo.setdefault("tags", {})
            if tag in tags:
                raise HubError(409, f"Reference refs/tags/{tag} already exists")
            tags[tag] = self.resolve(kind, repo_id, revision)
            self._save_repo(kind, repo_id, repo)

    def delete_tag(self, kind: str, repo_id: str, tag: str) -> None:
        with self.lock:
            repo = self.repo(kind, repo_id)
            if repo.get("tags", {}).pop(tag, None) is None:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            self._save_repo(kind, repo_id, repo)

    # -- commits --
    def commit(self, kind: str, repo_id: str, commit_id: str) -> dict[str, Any]:
        return json.loads((self._repo_dir(kind, repo_id) / "commits" / f"{commit_id}.json").read_text())

    def read(self, entry: Mapping[str, Any]) -> bytes:
        return self.object_path(entry["sha256"]).read_bytes()

    def _write_commit(
        self,
        kind: str,
        repo_id: str,
        parents: list[str],
        files: dict[str, dict[str, Any]],
        title: str,
        message: str,
        author: str,
    ) -> str:
        commit = {"parents": parents, "title": title, "message": message, "authors": [author], "date": _now()}
        commit["files"] = dict(sorted(files.items()))
        commit_id = hashlib.sha1(json.dumps(commit, sort_keys=True).encode()).hexdigest()
        commit["id"] = commit_id
        (self._repo_dir(kind, repo_id) / "commits" / f"{commit_id}.json").write_text(json.dumps(commit))
        return commit_id

    def history(self, kind: str, repo_id: str, head: str) -> Iterator[dict[str, Any]]:
        """First-parent history, newest first."""
        commit: dict[str, Any] | None = self.commit(kind, repo_id, head)
        while commit is not None:
            yield commit
            commit = self.commit(kind, repo_id, commit["parents"][0]) if commit["parents"] else None

    def last_commits(self, kind: str, repo_id: str, head: str, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
        """For each file or folder path, the newest commit that changed it (the tree ``expand`` data)."""
        pending, found = set(paths), {}
        commits = self.history(kind, repo_id, head)
        commit = next(commits, None)
        while pending and commit is not None:
            parent = next(commits, None)
            before = parent["files"] if parent else {}
            changed = {p for p in commit["files"].keys() | before.keys() if commit["files"].get(p) != before.get(p)}
            changed |= {folder for p in changed for folder in _parents(p)}
            for path in pending & changed:
                found[path] = commit
            pending -= changed
            commit = parent
        return found

    def writable_ref(self, kind: str, repo_id: str, revision: str) -> tuple[str, str]:
        """The ref a commit to `revision` moves: ("branches", name) or ("pullRequests", number)."""
        repo = self.repo(kind, repo_id)
        name = revision.removeprefix("refs/heads/")
        if name in repo["branches"]:
            return "branches", name
        if (match := _PR_REF_RE.match(revision)) and match.group(1) in repo["pullRequests"]:
            return "pullRequests", match.group(1)
        self.resolve(kind, repo_id, revision)  # 404 for an unknown revision
        raise HubError(400, f"Invalid rev id: {revision} is not a branch; commits can only be made on a branch")

    def apply_commit(
        self,
        kind: str,
        repo_id: str,
        revision: str,
        operations: list[dict[str, Any]],
        header: Mapping[str, Any],
        author: str,
        create_pr: bool,
    ) -> tuple[str, str | None]:
        """Apply the NDJSON commit operations to `revision`; returns (commit id, PR number or None)."""
        with self.lock:
            if create_pr:
                ref_kind, ref_name = "pullRequests", None
                head = self.resolve(kind, repo_id, revision)
            else:
                ref_kind, ref_name = self.writable_ref(kind, repo_id, revision)
                head = self.repo(kind, repo_id)[ref_kind][ref_name]
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(self.commit(kind, repo_id, head)["files"])
            for operation in operations:
                self._apply_operation(files, operation)
            if clash := next((p for p in files if any(folder in files for folder in _parents(p))), None):
                raise HubError(400, f"Cannot commit {clash}: one of its parent folders is a file")
            title = str(header.get("summary") or "").strip()
            if not title:
                raise HubError(400, "Commit summary is required")
            commit_id = self._write_commit(
                kind, repo_id, [head], files, title, str(header.get("description") or ""), author
            )
            repo = self.repo(kind, repo_id)
            if ref_name is None:
                ref_name = str(len(repo["pullRequests"]) + 1)
            repo[ref_kind][ref_name] = commit_id
            self._save_repo(kind, repo_id, repo)
            return commit_id, ref_name if create_pr else None

    def must_be_lfs(self, path: str, size: int, sample: bytes, files: Mapping[str, Mapping[str, Any]]) -> bool:
        """The Hub's rule: .gitattributes LFS patterns, large files, binary content, or already stored in LFS."""
        existing = files.get(path)
        if existing is not None and existing["lfs"]:
            return True
        if size > LFS_SIZE_THRESHOLD or b"\0" in sample:
            return True
        attributes = files.get(".gitattributes")
        text = self.read(attributes).decode(errors="replace") if attributes else ""
        return any(pattern.fullmatch(path) for pattern in _lfs_patterns(text))

    def _apply_operation(self, files: dict[str, dict[str, Any]], operation: dict[str, Any]) -> None:
        key, value = operation.get("key"), operation.get("value") or {}
        raw_path = str(value.get("path", ""))
        path = _check_repo_path(raw_path.rstrip("/") if key == "deletedFolder" else raw_path)
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')!r}")
            data = base64.b64decode(value.get("content", ""), validate=True)
            if data and self.must_be_lfs(path, len(data), data[:512], files):
                raise HubError(
                    400,
                    f"Your push was rejected because {path} is a binary or large file. "
                    "Please use https://git-lfs.github.com/ to store it (upload it as an LFS file).",
                )
            files[path] = _regular_entry(data, self.put_bytes(data))
        elif key == "lfsFile":
            sha256 = str(value.get("oid", ""))
            if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(sha256):
                raise HubError(400, f"Invalid LFS oid for {path}")
            if not self.has_object(sha256, value.get("size")):
                raise HubError(422, f"LFS object {sha256} of {path} was not uploaded")
            files[path] = _lfs_entry(sha256, self.object_path(sha256).stat().st_size)
        elif key == "deletedFile":
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            inside = [p for p in files if p.startswith(path + "/")]
            if not inside:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for p in inside:
                del files[p]
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")
