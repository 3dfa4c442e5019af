"""The local Hub's HTTP plumbing: the route table, request bodies, answers and errors, tokens, repo lookup.

The routes are methods of mixins (repos.py, content.py), registered by `_route` when their module is imported.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from .access import HubToken
from .store import HubError

if TYPE_CHECKING:
    from .server import _HubServer

log = logging.getLogger(__name__)

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
# URL prefix of non-model repos in git-style URLs (/datasets/ns/name/resolve/...), as on huggingface.co.
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_COPY_CHUNK = 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

_RouteFn = Callable[["_BaseHandler", dict[str, str]], None]
_Route = TypeVar("_Route", bound=Callable[..., None])
# Tried in registration order; within a module that order matters (the /api/ reading routes come before
# /resolve/, which matches some of their URLs), routes of different modules never match the same request.
_ROUTES: list[tuple[tuple[str, ...], re.Pattern[str], _RouteFn]] = []
_API_REPO = r"^/api/(?P<kinds>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_GIT_REPO = r"^/(?:(?P<prefix>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def _route(methods: str, pattern: str) -> Callable[[_Route], _Route]:
    def register(func: _Route) -> _Route:
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


class _BaseHandler(BaseHTTPRequestHandler):
    """What every route uses: dispatch, request bodies, answers and errors, the caller's token, repo lookup."""

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
        if not self._body_done:  # refused before its body was read (a 403): the client must not reuse the connection
            headers["Connection"] = "close"
        self._send(error.status, json.dumps({"error": error.message, **error.body}).encode(), headers=headers)

    # -- auth and repo lookup (who may do what: access.py) --
    def _caller(self) -> HubToken | None:
        """The caller's token; an Authorization header with an unknown token is a 401 like on huggingface.co."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        token = self.server.accounts.token(value.strip()) if scheme.lower() == "bearer" else None
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return token

    def _user(self) -> str | None:
        """The token's user (None without a token)."""
        token = self._caller()
        return token.user if token else None

    def _writer(self) -> HubToken:
        token = self._caller()
        if token is None:
            raise HubError(401, "You must be authenticated to write: pass a token (Authorization: Bearer ...)")
        return token

    def _writable(self, args: Mapping[str, str]) -> tuple[str, str, str]:
        """(kind, repo id, user) of a repo the caller may write: 401 without a token, 404 for a private repo it
        cannot see, 403 without write rights in its namespace."""
        token = self._writer()
        kind, repo_id, _ = self._readable(args)
        self.server.accounts.check_write(token, kind, repo_id)
        return kind, repo_id, token.user

    def _repo_ref(self, args: Mapping[str, str]) -> tuple[str, str]:
        kind = REPO_KINDS[args["kinds"]] if "kinds" in args else REPO_KINDS.get(args["prefix"], "model")
        namespace, name = unquote(args["ns"]), unquote(args["name"])
        if not (_NAME_RE.match(namespace) and _NAME_RE.match(name)) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo id: {namespace}/{name}")
        return kind, f"{namespace}/{name}"

    def _readable(self, args: Mapping[str, str]) -> tuple[str, str, dict[str, Any]]:
        """(kind, repo id, repo) of a repo the caller may read; private repos look missing to anyone but their
        namespace's users (a gated repo's files: `accounts.check_gate`)."""
        kind, repo_id = self._repo_ref(args)
        token = self._caller()
        repo = self.server.store.repo(kind, repo_id)
        if repo["private"] and not self.server.accounts.may_read(token, kind, repo_id):
            # Invisible rather than forbidden, as on huggingface.co: 401 without a token, else 404.
            raise HubError(401 if token is None else 404, f"Repository {kind}s/{repo_id} not found", "RepoNotFound")
        return kind, repo_id, repo

    def _repo_url(self, kind: str, repo_id: str) -> str:
        return f"{self._base_url}/{_URL_PREFIX[kind]}{repo_id}"
