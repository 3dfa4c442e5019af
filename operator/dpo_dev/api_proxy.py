"""An HTTPS reverse proxy to the Kubernetes API server that counts requests and injects faults on demand.

A client (the operator, under its ServiceAccount kubeconfig) is pointed at the proxy instead of the API server:

* every request is counted by verb and resource, named as the API server's RequestInfo names them
  (``LIST jobs``, ``GET dpojobs``, ``PATCH dpojobs/status``, ``POST events``, ``WATCH pods``,
  ``GET pods/log``; non-resource URLs by path, e.g. ``GET /version``): see :func:`classify` and
  :meth:`ApiProxy.counts`;
* while ``faults`` is set, each request gets one of a 500, a 429 with Retry-After, a dropped connection, a
  stall or a clean pass-through (``FAULTS``), and long watches are now and then cut in the middle
  (tests/operator/test_faults.py);
* watches and log streams are streamed through unchanged, chunk by chunk.

It runs on a thread of the caller (``ApiProxy(...).start()``), or as a process of its own
(``python -m dpo_dev.api_proxy``, driven by :class:`ApiProxyProcess`), so that a benchmark's own threads do
not compete with it for the GIL; the process form serves its counters under ``/_api_proxy/`` (a path the
API server never has). The proxy terminates TLS with a throwaway certificate and forwards the client's
``Authorization`` header, so bearer tokens (ServiceAccount kubeconfigs) work; client certificates do not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import signal
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

FAULTS = {"500": 25, "429": 25, "drop": 20, "stall": 5, "pass": 25}
"""Fault -> weight: stalls are rare because each holds a client thread for the whole stall."""
CONTROL_PREFIX = "/_api_proxy/"
"""Served by the proxy itself when ``control`` is on (the process form): counts, reset, faults."""
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
_NAMESPACE_SUBRESOURCES = {"status", "finalize"}
_VERBS = {"POST": "POST", "PUT": "PUT", "PATCH": "PATCH"}


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (clients trust it as their CA, or skip verification: it is a dev tool)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "proxy.crt", directory / "proxy.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def classify(method: str, path: str, query: Mapping[str, str]) -> tuple[str, str]:
    """(verb, resource) of one API request, as the API server's RequestInfo resolves it.

    Verbs: GET (one object), LIST, WATCH (``?watch=true`` or the legacy ``/watch/`` prefix), POST, PUT, PATCH,
    DELETE, DELETECOLLECTION. Resource: the plural, with ``/subresource`` (``dpojobs/status``, ``pods/log``);
    no group, no namespace. Anything outside /api and /apis (or discovery) is a non-resource URL: its path.
    """
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"] and len(parts) > 2:
        rest = parts[2:]
    elif parts[:1] == ["apis"] and len(parts) > 3:
        rest = parts[3:]
    else:
        return method.upper(), "/" + "/".join(parts)
    watch = query.get("watch", "").lower() in ("true", "1")
    if rest[0] == "watch":
        watch, rest = True, rest[1:]
    if len(rest) > 2 and rest[0] == "namespaces" and rest[2] not in _NAMESPACE_SUBRESOURCES:
        rest = rest[2:]  # a namespaced resource; otherwise the namespace itself (or its status/finalize)
    if not rest:
        return method.upper(), "/" + "/".join(parts)
    resource = rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    named = len(rest) > 1
    method = method.upper()
    if method == "GET":
        verb = "WATCH" if watch else ("GET" if named else "LIST")
    elif method == "DELETE":
        verb = "DELETE" if named else "DELETECOLLECTION"
    else:
        verb = _VERBS.get(method, method)
    return verb, resource


def key(verb: str, resource: str) -> str:
    return f"{verb} {resource}"


class ApiProxy:
    """Forwards to ``upstream`` (the API server, verified with ``ca_file``); counts every request; injects faults
    while ``faults`` is set.

    ``counts()`` / ``reset()`` read the counters from any thread; ``injected`` counts the faults (and passes)
    chosen while faults were on, ``statuses`` the response codes the client got.
    """

    def __init__(
        self,
        upstream: str,
        ca_file: Path,
        workdir: Path,
        stall_seconds: float = 30.0,
        *,
        seed: int = 11,
        control: bool = False,
        port: int = 0,
    ) -> None:
        self.upstream, self.stall_seconds, self.control = upstream.rstrip("/"), stall_seconds, control
        self.faults = threading.Event()
        self.injected: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self._requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._upstream_tls = ssl.create_default_context(cafile=str(ca_file))
        self.cert, key_file = self_signed(workdir)
        self._server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._server_tls.load_cert_chain(self.cert, key_file)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.port = port

    # --- public
    def start(self) -> ApiProxy:
        self._thread = threading.Thread(target=self._serve, name="api-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the API proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> ApiProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def counts(self) -> dict[str, int]:
        """Requests so far by ``"VERB resource"``, most frequent first."""
        with self._lock:
            return dict(self._requests.most_common())

    def reset(self) -> dict[str, int]:
        """The counts so far; the counters (requests, injected, statuses) start again from zero."""
        with self._lock:
            counts = dict(self._requests.most_common())
            self._requests.clear()
            self.injected.clear()
            self.statuses.clear()
        return counts

    def kubeconfig(self, source: Path, dest: Path) -> Path:
        """A copy of kubeconfig ``source`` whose clusters point at the proxy (trusting its certificate)."""
        return write_proxied_kubeconfig(source, dest, self.url, self.cert.read_bytes())

    # --- serving
    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)  # open watches are cut, not awaited
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=self._server_tls, backlog=1024)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._session = self._loop.run_until_complete(self._new_session())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(runner.cleanup())
                self._loop.run_until_complete(self._session.close())

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        # No connection limit: every open watch and log stream holds an upstream connection for its lifetime.
        connector = aiohttp.TCPConnector(limit=0)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=None))

    def _count(self, counter: Counter, name: Any) -> None:
        with self._lock:
            counter[name] += 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.control and request.path.startswith(CONTROL_PREFIX):
            return self._control(request)
        self._count(self._requests, key(*classify(request.method, request.path, request.query)))
        fault = self._rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0] if self.faults.is_set() else "pass"
        if self.faults.is_set():
            self._count(self.injected, fault)
        if fault == "500":
            self._count(self.statuses, 500)
            return web.json_response({"kind": "Status", "code": 500, "message": "injected"}, status=500)
        if fault == "429":
            self._count(self.statuses, 429)
            body = {"kind": "Status", "code": 429, "message": "injected throttling"}
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        if fault == "drop":
            request.transport.close()
            return web.Response(status=599)  # never sent: the connection is gone
        if fault == "stall":
            await asyncio.sleep(self.stall_seconds)
        return await self._forward(request)

    def _control(self, request: web.Request) -> web.Response:
        command = request.path[len(CONTROL_PREFIX) :]
        if command == "counts" and request.method == "GET":
            counts = self.counts()
        elif command == "reset" and request.method == "POST":
            counts = self.reset()
        elif command == "faults" and request.method == "POST":
            (self.faults.set if request.query.get("on") in ("1", "true") else self.faults.clear)()
            counts = self.counts()
        else:
            return web.json_response({"error": f"unknown control request {request.method} {request.path}"}, status=404)
        with self._lock:
            extra = {"injected": dict(self.injected), "statuses": {str(k): v for k, v in self.statuses.items()}}
        return web.json_response({"requests": counts, **extra, "faults": self.faults.is_set()})

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
            self._count(self.statuses, upstream.status)
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


FaultProxy = ApiProxy
"""The name tests/operator/test_faults.py knew it by."""


def write_proxied_kubeconfig(source: Path, dest: Path, url: str, ca_pem: bytes | None) -> Path:
    """Copy kubeconfig ``source`` to ``dest`` with every cluster's server set to ``url``, trusting ``ca_pem``
    (None: skip verification). Credentials are kept; the file is private to its owner (it holds a token)."""
    config = yaml.safe_load(Path(source).read_text())
    for entry in config.get("clusters") or []:
        cluster = {"server": url}
        if ca_pem is None:
            cluster["insecure-skip-tls-verify"] = True
        else:
            cluster["certificate-authority-data"] = base64.b64encode(ca_pem).decode()
        entry["cluster"] = cluster
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.touch(mode=0o600)
    dest.write_text(yaml.safe_dump(config))
    return dest


def upstream_of(kubeconfig: Path, ca_dest: Path) -> str:
    """The current context's API server URL; its CA written to ``ca_dest`` (what ApiProxy verifies it with)."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    current = config.get("current-context")
    context = next((c["context"] for c in config["contexts"] if c["name"] == current), config["contexts"][0]["context"])
    cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
    if "certificate-authority-data" in cluster:
        ca_dest.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
    else:
        ca_dest.write_bytes(Path(cluster["certificate-authority"]).read_bytes())
    return cluster["server"]


class ApiProxyProcess:
    """An ApiProxy in a process of its own (``python -m dpo_dev.api_proxy``), with the same counters.

    Usage::

        proxy = ApiProxyProcess(server, ca_file, workdir).start()
        proxy.kubeconfig(sa_kubeconfig, workdir / "proxied.kubeconfig")  # give this one to the client
        proxy.reset(); ...; per_verb = proxy.counts()
        proxy.stop()
    """

    def __init__(self, upstream: str, ca_file: Path, workdir: Path) -> None:
        self.upstream, self.ca_file, self.workdir = upstream, Path(ca_file), Path(workdir)
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.cert: Path = self.workdir / "proxy.crt"
        self._context = ssl.create_default_context()

    def start(self, timeout: float = 30.0) -> ApiProxyProcess:
        from .processes import die_with_parent

        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "dpo_dev.api_proxy", "--upstream", self.upstream, "--ca", str(self.ca_file)]
        self.process = subprocess.Popen(
            [*argv, "--workdir", str(self.workdir)],
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "proxy.log").open("ab"),
            text=True,
            preexec_fn=die_with_parent,
        )
        assert self.process.stdout is not None
        timer = threading.Timer(timeout, self.process.kill)
        timer.start()
        try:
            line = self.process.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            self.stop()
            raise RuntimeError(f"the API proxy did not start; see {self.workdir / 'proxy.log'}")
        self.url = json.loads(line)["url"]
        self._context = ssl.create_default_context(cafile=str(self.cert))
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> ApiProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, method: str, command: str) -> dict[str, Any]:
        request = urllib.request.Request(self.url + CONTROL_PREFIX + command, method=method)
        with urllib.request.urlopen(request, timeout=30, context=self._context) as response:
            return json.load(response)

    def counts(self) -> dict[str, int]:
        return self._call("GET", "counts")["requests"]

    def reset(self) -> dict[str, int]:
        return self._call("POST", "reset")["requests"]

    def set_faults(self, on: bool) -> None:
        self._call("POST", f"faults?on={int(on)}")

    def kubeconfig(self, source: Path, dest: Path) -> Path:
        return write_proxied_kubeconfig(source, dest, self.url, self.cert.read_bytes())


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM; prints {"url", "port"} as one JSON line on stdout once it listens."""
    parser = argparse.ArgumentParser(prog="python -m dpo_dev.api_proxy", description=__doc__)
    parser.add_argument("--upstream", required=True, help="the API server, https://HOST:PORT")
    parser.add_argument("--ca", required=True, type=Path, help="the API server's CA (PEM)")
    parser.add_argument("--workdir", required=True, type=Path, help="where the proxy's certificate goes")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = ApiProxy(args.upstream, args.ca, args.workdir, control=True, port=args.port).start()
    print(json.dumps({"url": proxy.url, "port": proxy.port}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with contextlib.suppress(KeyboardInterrupt):
        stop.wait()
    proxy.stop()


if __name__ == "__main__":
    main()
