"""LocalHub: the Hub-compatible HTTP server on a background thread."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterable, Mapping
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import TracebackType

from .access import Accounts, HubToken
from .content import _ContentRoutes
from .handler import HubRequest
from .repos import _RepoRoutes
from .store import _Store


class _Handler(_RepoRoutes, _ContentRoutes):
    """The request handler: the routes of both mixins."""


class _HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], store: _Store, accounts: Accounts, requests: list[HubRequest]) -> None:
        super().__init__(address, _Handler)
        self.store = store
        self.accounts = accounts
        self.requests = requests
        # Signs LFS upload URLs: like S3 presigned URLs, the PUT carries no Authorization header.
        self.secret = secrets.token_bytes(32)

    def sign(self, sha256: str, size: int) -> str:
        return hmac.new(self.secret, f"{sha256}:{size}".encode(), hashlib.sha256).hexdigest()


class LocalHub:
    """A Hub-compatible HTTP server on a background thread, storing everything under `root_dir`.

    `tokens` are the accepted access tokens: a mapping token -> user name (a write token) or HubToken (its user,
    role and fine-grained scopes), or an iterable of write tokens that all belong to `user`. `orgs` maps each
    organization to its members' roles (read, contributor, write, admin). What each may do: see access.py.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike[str],
        tokens: Mapping[str, str | HubToken] | Iterable[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        user: str = "local",
        orgs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.root_dir = Path(root_dir)
        given = dict(tokens) if isinstance(tokens, Mapping) else dict.fromkeys(tokens, user)
        self.accounts = Accounts(
            {value: t if isinstance(t, HubToken) else HubToken(t) for value, t in given.items()}, orgs or {}
        )
        self.tokens = {value: token.user for value, token in self.accounts.tokens.items()}
        """token -> the user it belongs to"""
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
        self._server = _HubServer((self.host, self.port), _Store(self.root_dir), self.accounts, self.requests)
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
