"""Routes of the account and of repos as a whole: whoami, create/delete, README metadata, branches, tags."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from .handler import _API_REPO, _NAME_RE, _URL_PREFIX, _BaseHandler, _route
from .store import HubError


class _RepoRoutes(_BaseHandler):
    # -- account and repo management --
    @_route("GET", r"^/api/whoami-v2$")
    def _whoami(self, args: dict[str, str]) -> None:
        token = self._caller()
        if token is None:
            raise HubError(401, "Invalid username or password.")
        self._send_json(self.server.accounts.whoami(token))

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
        token = self._writer()
        kind, repo_id = self._repo_from_body(body, token.user)
        self.server.accounts.check_write(token, kind, repo_id, creating=True)  # before the 409, as on the Hub
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
        token = self._writer()
        kind, repo_id = self._repo_from_body(body, token.user)
        self._readable({"kinds": f"{kind}s", "ns": repo_id.split("/")[0], "name": repo_id.split("/")[1]})
        self.server.accounts.check_write(token, kind, repo_id)
        self.server.store.delete_repo(kind, repo_id)
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
        kind, repo_id, _ = self._writable(args)
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
        kind, repo_id, _ = self._writable(args)
        if self.command == "POST":
            tag = str(self._json().get("tag") or "")
            self.server.store.create_tag(kind, repo_id, tag, unquote(args["ref"]))
        else:
            self.server.store.delete_tag(kind, repo_id, unquote(args["ref"]))
        self._send_json({})

    @_route("PUT", _API_REPO + r"/settings$")
    def _settings(self, args: dict[str, str]) -> None:
        """update_repo_settings: gated (auto, manual or false) and visibility."""
        kind, repo_id, _ = self._writable(args)
        body = self._json()
        gated = body.get("gated")
        if gated not in (None, False, "auto", "manual"):
            raise HubError(400, f"Invalid gated value: {gated!r}")
        visibility = body.get("visibility")
        private = body.get("private") if visibility is None else visibility == "private"
        self.server.store.update_settings(kind, repo_id, gated=gated, private=private)
        self._send_json({})

    @_route("POST", _API_REPO + r"/user-access-request/grant$")
    def _grant(self, args: dict[str, str]) -> None:
        """grant_access: a user may read the gated repo's files."""
        kind, repo_id, _ = self._writable(args)
        user = str(self._json().get("user") or "")
        if not _NAME_RE.match(user):
            raise HubError(400, f"Invalid user: {user!r}")
        self.server.store.grant_access(kind, repo_id, user)
        self._send_json({})

    @_route("GET", _API_REPO + r"/auth-check(?P<write>/write)?$")
    def _auth_check(self, args: dict[str, str]) -> None:
        """auth_check: 200 when the caller may read (the files of a gated repo too) or, with /write, write it."""
        if args["write"]:
            self._writable(args)
        else:
            kind, repo_id, repo = self._readable(args)
            self.server.accounts.check_gate(self._caller(), kind, repo_id, repo)
        self._send_json({})
