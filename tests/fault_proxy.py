"""An HTTPS reverse proxy to the API server that injects faults on demand (tests only).

A real API server does not fail on request, so the operator's client talks to this proxy instead: while
`faults` is on, each request gets one of a 500, a 429 with Retry-After, a dropped connection, a 30 s stall or
a clean pass-through; watches and log streams are streamed through unchanged.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import subprocess
import threading
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

FAULTS = {"500": 25, "429": 25, "drop": 20, "stall": 5, "pass": 25}
"""Fault -> weight: stalls are rare because each holds a client thread for the whole stall."""
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (clients of the proxy skip verification; it is a test fixture)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "proxy.crt", directory / "proxy.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


class FaultProxy:
    """Forwards to `upstream` (the API server, verified with `ca_file`); injects faults while `faults` is set."""

    def __init__(self, upstream: str, ca_file: Path, workdir: Path, stall_seconds: float = 30.0) -> None:
        self.upstream, self.stall_seconds = upstream.rstrip("/"), stall_seconds
        self.faults = threading.Event()
        self.injected: Counter[str] = Counter()
        self._rng = random.Random(11)
        self._upstream_tls = ssl.create_default_context(cafile=str(ca_file))
        cert, key = self_signed(workdir)
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0

    def start(self) -> FaultProxy:
        threading.Thread(target=self._serve, name="fault-proxy", daemon=True).start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._server_tls)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = self._loop.run_until_complete(self._new_session())
        self._ready.set()
        self._loop.run_forever()

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=None))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0] if self.faults.is_set() else "pass"
        self.injected[fault] += 1
        if fault == "500":
            return web.json_response({"kind": "Status", "code": 500, "message": "injected"}, status=500)
        if fault == "429":
            body = {"kind": "Status", "code": 429, "message": "injected throttling"}
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        if fault == "drop":
            request.transport.close()
            return web.Response(status=599)  # never sent: the connection is gone
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
        return await self._forward(request)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body or None,
            ssl=self._upstream_tls,
            skip_auto_headers=("Content-Type",),  # the kubernetes client sends none; octet-stream would be a 415
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS},
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                if self.faults.is_set() and self._rng.random() < 0.02:
                    request.transport.close()  # a long watch cut in the middle
                    break
            return response
