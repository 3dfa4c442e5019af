"""Routes that read and write a repo's content: repo info, trees, refs, history, downloads (with Range),
preupload, NDJSON commits and the LFS batch, upload and verify steps."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote

from .gitattributes import _GitIgnore
from .handler import _API_REPO, _COPY_CHUNK, _GIT_REPO, _URL_PREFIX, _BaseHandler, _route
from .store import _SHA256_RE, DEFAULT_BRANCH, HubError, _check_repo_path, _pointer_size


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


class _ContentRoutes(_BaseHandler):
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
                "gated": repo.get("gated", False),
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
        kind, repo_id, repo = self._readable(args)
        self.server.accounts.check_gate(self._caller(), kind, repo_id, repo)
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
        kind, repo_id, _ = self._writable(args)
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
        kind, repo_id, user = self._writable(args)
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
        kind, repo_id, _ = self._writable(args)
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
        self._writable(args)
        body = self._json()
        oid, size = str(body.get("oid", "")), body.get("size")
        if not _SHA256_RE.match(oid) or not self.server.store.has_object(oid, size if isinstance(size, int) else None):
            raise HubError(404, f"LFS object {oid} ({size} bytes) not found")
        self._send_json({"success": True}, content_type="application/vnd.git-lfs+json")
