"""A local, offline stand-in for the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses.

Tests and the local demo push models and load datasets through the *real* `huggingface_hub` client (and
`datasets`), so what is exercised is the code that talks to huggingface.co in production. The server keeps
git-like state on disk: repos (models, datasets, spaces) with branches, PR refs and immutable commits (sha1 ids),
plus one content-addressed object store (sha256) shared by regular and LFS files.

Routes (``{kinds}`` is models|datasets|spaces, ``{repo}`` is ns/name, git-style URLs prefix datasets/ or spaces/):
GET /api/whoami-v2; POST /api/repos/create; DELETE /api/repos/delete; POST /api/validate-yaml;
GET /api/{kinds}/{repo}[/revision/{rev}]; GET .../tree/{rev}[/{path}]; POST .../paths-info/{rev};
GET .../refs; GET .../commits/{rev}; POST|DELETE .../branch/{name}; POST .../tag/{rev}; DELETE .../tag/{name};
POST .../preupload/{rev};
POST .../commit/{rev} (NDJSON); POST /{repo}.git/info/lfs/objects/batch and .../verify; PUT /lfs-upload/{sha256}
(signed URL); GET|HEAD /{repo}/resolve/{rev}/{path} (with Range). `LocalHub.requests` logs every request answered.

Clients need ``HF_HUB_DISABLE_XET=1`` (uploads otherwise go through Xet storage, which this server does not speak)
and offline mode off; pass the endpoint explicitly (``HfApi(endpoint=hub.url)``) or set ``HF_ENDPOINT`` before
`huggingface_hub` is imported.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger(__name__)

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
# URL prefix of non-model repos in git-style URLs (/datasets/ns/name/resolve/...), as on huggingface.co.
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
DEFAULT_BRANCH = "main"
# The Hub refuses regular (non-LFS) files above 10 MiB.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_COPY_CHUNK = 1024 * 1024
# What huggingface.co writes in the "initial commit" of a new repo: it decides which files go to LFS.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
        "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
        "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
        "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
    )
)  # fmt: skip

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
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


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a gitignore/gitattributes glob; a pattern without an inner slash matches at any depth."""
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.strip("/")
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile(("" if anchored else "(?:.*/)?") + "".join(out))


def _lfs_patterns(gitattributes: str) -> list[re.Pattern[str]]:
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(_glob_regex(fields[0]))
    return patterns


@dataclass(frozen=True)
class _IgnoreRule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool


class _GitIgnore:
    """Enough of .gitignore semantics for the preupload ``shouldIgnore`` answer (last match wins)."""

    def __init__(self, text: str) -> None:
        self.rules: list[_IgnoreRule] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            line = line.removeprefix("!")
            self.rules.append(_IgnoreRule(_glob_regex(line), negate, line.endswith("/")))

    def ignores(self, path: str) -> bool:
        parts = path.split("/")
        for depth in range(1, len(parts) + 1):
            candidate, is_dir = "/".join(parts[:depth]), depth < len(parts)
            verdict = False
            for rule in self.rules:
                if (is_dir or not rule.dir_only) and rule.regex.fullmatch(candidate):
                    verdict = not rule.negate
            if verdict:  # git never looks inside an ignored folder
                return True
        return False


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


def _tree_entry(path: str, entry: Mapping[str, Any] | None, folder_oid: str | None) -> dict[str, Any]:
    """A file (`entry`) or folder (`folder_oid`) as the /tree and /paths-info endpoints describe it."""
    if entry is None:
        return {"type": "directory", "oid": folder_oid, "size": 0, "path": path}
    item: dict[str, Any] = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry["lfs"]:
        item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": _pointer_size(entry)}
    return item


def _folder_oid(files: Mapping[str, Mapping[str, Any]], folder: str) -> str:
    """A stable id for a folder's content (git would hash a tree object; any content hash serves the client)."""
    listing = "".join(f"{p} {e['oid']}\n" for p, e in sorted(files.items()) if p.startswith(folder + "/"))
    return hashlib.sha1(listing.encode()).hexdigest()


def _flag(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true")


_RouteFn = Callable[["_Handler", dict[str, str]], None]
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], _RouteFn]] = []
_API_REPO = r"^/api/(?P<kinds>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def _route(methods: str, pattern: str) -> Callable[[_RouteFn], _RouteFn]:
    def register(func: _RouteFn) -> _RouteFn:
        _ROUTES.append((tuple(methods.split()), re.compile(pattern), func))
        return func

    return register


@dataclass(frozen=True)
class HubRequest:
    """One request the server answered: tests assert from these what a client fetched (GET of .../resolve/...)."""

    method: str
    path: str
    """The URL path, without the query."""
    status: int


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], store: _Store, tokens: Mapping[str, str], requests: list[HubRequest]
    ) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.tokens = dict(tokens)
        self.requests = requests
        # Signs LFS upload URLs: like S3 presigned URLs, the PUT carries no Authorization header.
        self.secret = secrets.token_bytes(32)

    def sign(self, sha256: str, size: int) -> str:
        return hmac.new(self.secret, f"{sha256}:{size}".encode(), hashlib.sha256).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HubServer
    _query: dict[str, list[str]]
    _body_done: bool  # the request body was fully read, so the connection can serve the next request
    _responded: bool  # headers went out: an error can no longer be reported as a response

    # -- plumbing --
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.requests.append(HubRequest(self.command or "", urlsplit(self.path).path, int(code)))
        super().log_request(code, size)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._query = parse_qs(split.query)
        self._body_done = not self._has_body()
        self._responded = False
        try:
            for methods, pattern, func in _ROUTES:
                if self.command in methods and (match := pattern.match(split.path)):
                    func(self, match.groupdict(default=""))
                    break
            else:
                raise HubError(404, f"Not found: {self.command} {split.path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:
            if not isinstance(error, HubError):
                log.exception("local hub: %s %s failed", self.command, self.path)
            if self._responded:
                self.close_connection = True
            else:
                self._send_error(error if isinstance(error, HubError) else HubError(500, "Internal server error"))
        if not self._body_done:  # unread request bytes would be parsed as the next request
            self.close_connection = True

    def end_headers(self) -> None:
        self._responded = True
        super().end_headers()

    @property
    def _base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return "http://" + (self.headers.get("Host") or f"{host}:{port}")

    def _has_body(self) -> bool:
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        return chunked or int(self.headers.get("Content-Length") or 0) > 0

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in pieces, de-chunked; huge LFS uploads never sit in memory."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline(65537).split(b";")[0].strip() or b"0", 16):
                yield from self._read_exactly(size)
                self.rfile.readline()
            while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
        self._body_done = True

    def _read_exactly(self, size: int) -> Iterator[bytes]:
        while size > 0:
            chunk = self.rfile.read(min(size, _COPY_CHUNK))
            if not chunk:
                raise HubError(400, "Request body ended early")
            size -= len(chunk)
            yield chunk

    def _json(self) -> dict[str, Any]:
        try:
            data = json.loads(b"".join(self._iter_body()) or b"{}")
        except ValueError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from error
        if not isinstance(data, dict):
            raise HubError(400, "JSON body must be an object")
        return data

    def _send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: Mapping[str, str] | None = None
    ) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, data: Any, status: int = 200, content_type: str = "application/json") -> None:
        self._send(status, json.dumps(data).encode(), content_type)

    def _send_error(self, error: HubError) -> None:
        # Header values must be latin-1; the JSON body keeps the exact message.
        message = " ".join(error.message.split()).encode("ascii", "backslashreplace").decode()
        headers = {"X-Error-Message": message, **error.headers}
        if error.code:
            headers["X-Error-Code"] = error.code
        self._send(error.status, json.dumps({"error": error.message, **error.body}).encode(), headers=headers)

    # -- auth and repo lookup --
    def _user(self) -> str | None:
        """The token's user; an Authorization header with an unknown token is a 401 like on huggingface.co."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.server.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _writer(self) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write: pass a token (Authorization: Bearer ...)")
        return user

    def _repo_ref(self, args: Mapping[str, str]) -> tuple[str, str]:
        kind = REPO_KINDS[args["kinds"]] if "kinds" in args else REPO_KINDS.get(args["prefix"], "model")
        namespace, name = unquote(args["ns"]), unquote(args["name"])
        if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo id: {namespace}/{name}")
        return kind, f"{namespace}/{name}"

    def _readable(self, args: Mapping[str, str]) -> tuple[str, str, dict[str, Any]]:
        """(kind, repo id, repo) of a repo the caller may read; private repos look missing without a token."""
        kind, repo_id = self._repo_ref(args)
        user = self._user()
        repo = self.server.store.repo(kind, repo_id)
        if repo["private"] and user is None:
            raise HubError(401, f"Repository {kind}s/{repo_id} not found", "RepoNotFound")
        return kind, repo_id, repo

    def _repo_url(self, kind: str, repo_id: str) -> str:
        return f"{self._base_url}/{_URL_PREFIX[kind]}{repo_id}"

    # -- account and repo management --
    @_route("GET", r"^/api/whoami-v2$")
    def _whoami(self, args: dict[str, str]) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _repo_from_body(self, body: Mapping[str, Any], user: str) -> tuple[str, str]:
        """(kind, repo id) named by a create/delete payload; the namespace defaults to the caller."""
        kind = str(body.get("type") or "model")
        namespace, name = str(body.get("organization") or user), str(body.get("name") or "")
        if kind not in _URL_PREFIX or not (_NAME_RE.match(namespace) and _NAME_RE.match(name)):
            raise HubError(400, f"Invalid repo: type={kind!r} id={namespace}/{name}")
        return kind, f"{namespace}/{name}"

    @_route("POST", r"^/api/repos/create$")
    def _create_repo(self, args: dict[str, str]) -> None:
        body = self._json()
        kind, repo_id = self._repo_from_body(body, self._writer())
        private = body.get("visibility") == "private" or body.get("private") is True
        url = self._repo_url(kind, repo_id)
        try:
            self.server.store.create_repo(kind, repo_id, private)
        except HubError as error:
            if error.status == 409:  # huggingface_hub reads the url of the existing repo (exist_ok=True)
                error.body["url"] = url
            raise
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    @_route("DELETE", r"^/api/repos/delete$")
    def _delete_repo(self, args: dict[str, str]) -> None:
        body = self._json()
        self.server.store.delete_repo(*self._repo_from_body(body, self._writer()))
        self._send_json({})

    @_route("POST", r"^/api/validate-yaml$")
    def _validate_yaml(self, args: dict[str, str]) -> None:
        """Checks the README front matter is delimited; its YAML is not interpreted (stdlib has no YAML parser)."""
        lines = str(self._json().get("content") or "").splitlines()
        if lines and lines[0].strip() == "---" and not any(line.strip() == "---" for line in lines[1:]):
            self._send_json({"errors": [{"message": "Metadata block is not closed by '---'"}]}, status=400)
        else:
            self._send_json({"errors": [], "warnings": []})

    @_route("POST DELETE", _API_REPO + r"/branch/(?P<branch>[^/]+)$")
    def _branch(self, args: dict[str, str]) -> None:
        self._writer()
        kind, repo_id = self._repo_ref(args)
        branch = unquote(args["branch"])
        if self.command == "POST":
            starting_point = self._json().get("startingPoint")
            self.server.store.create_branch(kind, repo_id, branch, starting_point)
        else:
            self.server.store.delete_branch(kind, repo_id, branch)
        self._send_json({})

    @_route("POST DELETE", _API_REPO + r"/tag/(?P<ref>[^/]+)$")
    def _tag(self, args: dict[str, str]) -> None:
        """POST tags the revision in the URL with the body's ``tag``; DELETE removes the tag named in the URL."""
        self._writer()
        kind, repo_id = self._repo_ref(args)
        if self.command == "POST":
            tag = str(self._json().get("tag") or "")
            self.server.store.create_tag(kind, repo_id, tag, unquote(args["ref"]))
        else:
            self.server.store.delete_tag(kind, repo_id, unquote(args["ref"]))
        self._send_json({})

    # -- reading --
    @_route("GET", _API_REPO + r"(?:/revision/(?P<rev>.+))?$")
    def _repo_info(self, args: dict[str, str]) -> None:
        kind, repo_id, repo = self._readable(args)
        store = self.server.store
        commit = store.commit(kind, repo_id, store.resolve(kind, repo_id, unquote(args["rev"]) or DEFAULT_BRANCH))
        with_blobs = _flag(self._query.get("blobs"))
        siblings = []
        for path, entry in commit["files"].items():
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    size = entry["size"]
                    sibling["lfs"] = {"sha256": entry["sha256"], "size": size, "pointerSize": _pointer_size(entry)}
            siblings.append(sibling)
        self._send_json(
            {
                "_id": hashlib.sha1(f"{kind}/{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit["id"],
                "lastModified": commit["date"],
                "createdAt": repo["createdAt"],
                "private": repo["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "usedStorage": sum(entry["size"] for entry in commit["files"].values()),
            }
        )

    def _listing(
        self, kind: str, repo_id: str, commit: Mapping[str, Any], paths: list[tuple[str, bool]], expand: bool
    ) -> list[dict[str, Any]]:
        """Entries for (path, is_folder) pairs, with each one's last commit when `expand` is asked for."""
        files = commit["files"]
        last = self.server.store.last_commits(kind, repo_id, commit["id"], [p for p, _ in paths]) if expand else {}
        entries = []
        for path, is_folder in paths:
            item = _tree_entry(
                path, None if is_folder else files[path], _folder_oid(files, path) if is_folder else None
            )
            if path in last:
                item["lastCommit"] = {"id": last[path]["id"], "title": last[path]["title"], "date": last[path]["date"]}
            entries.append(item)
        return entries

    @_route("GET", _API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
    def _tree(self, args: dict[str, str]) -> None:
        kind, repo_id, _ = self._readable(args)
        store = self.server.store
        commit = store.commit(kind, repo_id, store.resolve(kind, repo_id, unquote(args["rev"])))
        folder = unquote(args["path"]).strip("/")
        prefix = f"{folder}/" if folder else ""
        below = [p[len(prefix) :] for p in commit["files"] if p.startswith(prefix)]
        if folder and not below:
            raise HubError(404, f"{folder} does not exist or is not a folder", "EntryNotFound")
        recursive = _flag(self._query.get("recursive"))
        found: dict[str, bool] = {}
        for rest in below:
            parts = rest.split("/")
            if recursive:
                found.update({prefix + "/".join(parts[:depth]): True for depth in range(1, len(parts))})
                found[prefix + rest] = False
            else:
                found[prefix + parts[0]] = len(parts) > 1
        paths = sorted(found.items(), key=lambda item: (not item[1], item[0]))
        self._send_json(self._listing(kind, repo_id, commit, paths, _flag(self._query.get("expand"))))

    @_route("POST", _API_REPO + r"/paths-info/(?P<rev>.+)$")
    def _paths_info(self, args: dict[str, str]) -> None:
        kind, repo_id, _ = self._readable(args)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = self._json()
            wanted, expand = [str(p) for p in body.get("paths", [])], bool(body.get("expand"))
        else:
            form = parse_qs(b"".join(self._iter_body()).decode())
            wanted, expand = form.get("paths", []), _flag(form.get("expand"))
        store = self.server.store
        commit = store.commit(kind, repo_id, store.resolve(kind, repo_id, unquote(args["rev"])))
        paths = []
        for path in dict.fromkeys(p.strip("/") for p in wanted):
            if path in commit["files"]:
                paths.append((path, False))
            elif path and any(p.startswith(path + "/") for p in commit["files"]):
                paths.append((path, True))
        self._send_json(self._listing(kind, repo_id, commit, paths, expand))

    @_route("GET", _API_REPO + r"/refs$")
    def _refs(self, args: dict[str, str]) -> None:
        _, _, repo = self._readable(args)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo["branches"].items()]
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.get("tags", {}).items()]
        refs: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if _flag(self._query.get("include_prs")):
            refs["pullRequests"] = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                for n, c in repo["pullRequests"].items()
            ]
        self._send_json(refs)

    @_route("GET", _API_REPO + r"/commits/(?P<rev>.+)$")
    def _commits(self, args: dict[str, str]) -> None:
        kind, repo_id, _ = self._readable(args)
        store = self.server.store
        head = store.resolve(kind, repo_id, unquote(args["rev"]))
        self._send_json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "date": c["date"],
                    "authors": [{"user": a} for a in c["authors"]],
                }
                for c in store.history(kind, repo_id, head)
            ]
        )

    @_route("GET HEAD", _GIT_REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
    def _resolve(self, args: dict[str, str]) -> None:
        kind, repo_id, _ = self._readable(args)
        store = self.server.store
        commit_id = store.resolve(kind, repo_id, unquote(args["rev"]))
        path = unquote(args["path"])
        entry = store.commit(kind, repo_id, commit_id)["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id})
        size = entry["size"]
        etag = entry["sha256"] if entry["lfs"] else entry["oid"]
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)})
        start, end, status = 0, size - 1, 200
        range_match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if self.command == "GET" and range_match and any(range_match.groups()):
            first, last = range_match.groups()
            start = int(first) if first else max(size - int(last), 0)
            end = min(int(last), size - 1) if first and last else size - 1
            if start >= size or start > end:
                raise HubError(
                    416, "Requested range not satisfiable", headers={**headers, "Content-Range": f"bytes */{size}"}
                )
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            status = 206
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if self.command == "GET":
            with store.object_path(entry["sha256"]).open("rb") as blob:
                blob.seek(start)
                self._copy(blob, end - start + 1)

    def _copy(self, source: BinaryIO, length: int) -> None:
        while length > 0:
            chunk = source.read(min(length, _COPY_CHUNK))
            if not chunk:
                raise OSError("object shorter than recorded")
            self.wfile.write(chunk)
            length -= len(chunk)

    # -- writing --
    @_route("POST", _API_REPO + r"/preupload/(?P<rev>.+)$")
    def _preupload(self, args: dict[str, str]) -> None:
        """Tells the client which files go to LFS, which are ignored, and the oid already stored for each path."""
        self._writer()
        kind, repo_id, _ = self._readable(args)
        body = self._json()
        store = self.server.store
        files = store.commit(kind, repo_id, store.resolve(kind, repo_id, unquote(args["rev"])))["files"]
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in files:
            gitignore = store.read(files[".gitignore"]).decode(errors="replace")
        ignore = _GitIgnore(str(gitignore or ""))
        answers = []
        for item in body.get("files", []):
            path = _check_repo_path(str(item.get("path", "")))
            sample = base64.b64decode(item.get("sample") or "")
            lfs = store.must_be_lfs(path, int(item.get("size") or 0), sample, files)
            existing = files.get(path)
            oid = None if existing is None else existing["sha256"] if existing["lfs"] else existing["oid"]
            answers.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": ignore.ignores(path),
                    "oid": oid,
                }
            )
        self._send_json({"files": answers})

    @_route("POST", _API_REPO + r"/commit/(?P<rev>.+)$")
    def _commit(self, args: dict[str, str]) -> None:
        user = self._writer()
        kind, repo_id, _ = self._readable(args)
        lines = [line for line in b"".join(self._iter_body()).splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as error:
            raise HubError(400, f"Invalid NDJSON commit payload: {error}") from error
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        create_pr = _flag(self._query.get("create_pr"))
        revision = unquote(args["rev"])
        commit_id, pr_number = self.server.store.apply_commit(
            kind, repo_id, revision, items[1:], items[0].get("value") or {}, user, create_pr
        )
        repo_url = self._repo_url(kind, repo_id)
        answer = {
            "success": True,
            "commitOid": commit_id,
            "commitUrl": f"{repo_url}/commit/{commit_id}",
            "hookOutput": "",
        }
        if pr_number is not None:
            answer["pullRequestUrl"] = f"{repo_url}/discussions/{pr_number}"
        self._send_json(answer)

    @_route("POST", _GIT_REPO + r"\.git/info/lfs/objects/batch$")
    def _lfs_batch(self, args: dict[str, str]) -> None:
        """git-lfs batch API, basic transfer only: a signed PUT URL per missing object, plus a verify action."""
        self._writer()
        kind, repo_id, _ = self._readable(args)
        body = self._json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the LFS 'upload' operation is supported; download files with /resolve")
        store = self.server.store
        objects = []
        for item in body.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": error})
                continue
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not store.has_object(oid, size):
                query = f"size={size}&sig={self.server.sign(oid, size)}"
                verify = f"{self._base_url}/{_URL_PREFIX[kind]}{repo_id}.git/info/lfs/objects/verify"
                answer["actions"] = {
                    "upload": {"href": f"{self._base_url}/lfs-upload/{oid}?{query}", "header": {}},
                    "verify": {"href": verify, "header": {}},
                }
            objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    @_route("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
    def _lfs_upload(self, args: dict[str, str]) -> None:
        """The storage side of LFS: authorised by the URL signature, checks the content against its sha256."""
        oid = args["oid"]
        size_values = self._query.get("size", [])
        size = int(size_values[0]) if size_values and size_values[0].isdigit() else -1
        signature = (self._query.get("sig") or [""])[0]
        if size < 0 or not hmac.compare_digest(signature, self.server.sign(oid, size)):
            raise HubError(403, "Invalid or expired upload URL signature")
        self.server.store.put_stream(self._iter_body(), oid, size)
        self._send(200, b"", "text/plain")

    @_route("POST", _GIT_REPO + r"\.git/info/lfs/objects/verify$")
    def _lfs_verify(self, args: dict[str, str]) -> None:
        self._writer()
        self._readable(args)
        body = self._json()
        oid, size = str(body.get("oid", "")), body.get("size")
        if not _SHA256_RE.match(oid) or not self.server.store.has_object(oid, size if isinstance(size, int) else None):
            raise HubError(404, f"LFS object {oid} ({size} bytes) not found")
        self._send_json({"success": True}, content_type="application/vnd.git-lfs+json")


class LocalHub:
    """A Hub-compatible HTTP server on a background thread, storing everything under `root_dir`.

    `tokens` are the accepted access tokens: a mapping token -> user name, or an iterable of tokens that all
    belong to `user`. Any valid token may read and write every repo (there are no orgs or permissions).
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        tokens: Mapping[str, str] | Iterable[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        user: str = "local",
    ) -> None:
        self.root_dir = Path(root_dir)
        self.tokens = dict(tokens) if isinstance(tokens, Mapping) else dict.fromkeys(tokens, user)
        self.host = host
        self.port = port
        self._server: _HubServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[HubRequest] = []
        """Every request answered, in order (appended by the server's threads)."""

    @property
    def url(self) -> str:
        """The endpoint to hand to clients (``HfApi(endpoint=...)`` / ``HF_ENDPOINT``)."""
        if self._server is None:
            raise RuntimeError("LocalHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        if self._server is not None:
            raise RuntimeError("LocalHub is already started")
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self._server = _HubServer((self.host, self.port), _Store(self.root_dir), self.tokens, self.requests)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve a LocalHub until SIGINT/SIGTERM (the local demo runs it standalone)."""
    parser = argparse.ArgumentParser(prog="python -m dpo_dev.hub", description=main.__doc__)
    parser.add_argument("--root", required=True, type=Path, help="directory holding repos and objects")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", action="append", required=True, help="an accepted token (repeatable)")
    parser.add_argument("--user", default="local", help="user name the tokens belong to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    with LocalHub(args.root, args.token, args.host, args.port, user=args.user) as hub:
        print(f"LocalHub serving {args.root} at {hub.url}", flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
