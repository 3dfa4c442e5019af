"""dpo_dev.api_proxy without a control plane: a tiny HTTPS upstream (aiohttp) stands in for the API server."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from dpo_dev.api_proxy import ApiProxy, ApiProxyProcess, classify, self_signed, upstream_of, write_proxied_kubeconfig

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x", {}, ("GET", "dpojobs")),
        ("GET", "/apis/dpo-operator.io/v1alpha1/dpojobs", {}, ("LIST", "dpojobs")),
        ("GET", "/apis/dpo-operator.io/v1alpha1/dpojobs", {"watch": "true"}, ("WATCH", "dpojobs")),
        ("GET", "/apis/batch/v1/namespaces/a/jobs", {"labelSelector": "x"}, ("LIST", "jobs")),
        ("GET", "/apis/batch/v1/namespaces/a/jobs", {"watch": "1"}, ("WATCH", "jobs")),
        ("GET", "/api/v1/watch/namespaces/a/pods", {}, ("WATCH", "pods")),
        ("POST", "/apis/batch/v1/namespaces/a/jobs", {}, ("POST", "jobs")),
        ("PATCH", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x/status", {}, ("PATCH", "dpojobs/status")),
        ("PUT", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x/finalizers", {}, ("PUT", "dpojobs/finalizers")),
        ("GET", "/api/v1/namespaces/a/pods/p/log", {"follow": "true"}, ("GET", "pods/log")),
        ("POST", "/api/v1/namespaces/a/events", {}, ("POST", "events")),
        ("DELETE", "/api/v1/namespaces/a/configmaps/c", {}, ("DELETE", "configmaps")),
        ("DELETE", "/api/v1/namespaces/a/configmaps", {}, ("DELETECOLLECTION", "configmaps")),
        ("GET", "/api/v1/namespaces", {}, ("LIST", "namespaces")),
        ("GET", "/api/v1/namespaces/a", {}, ("GET", "namespaces")),
        ("PUT", "/api/v1/namespaces/a/finalize", {}, ("PUT", "namespaces/finalize")),
        ("GET", "/api/v1/nodes/n", {}, ("GET", "nodes")),
        ("POST", "/api/v1/namespaces/s/serviceaccounts/sa/token", {}, ("POST", "serviceaccounts/token")),
        ("GET", "/version", {}, ("GET", "/version")),
        ("GET", "/apis", {}, ("GET", "/apis")),
        ("GET", "/apis/batch/v1", {}, ("GET", "/apis/batch/v1")),
        ("GET", "/api/v1", {}, ("GET", "/api/v1")),
    ],
)
def test_classify_names_requests_as_the_api_server_does(method, path, query, expected) -> None:
    assert classify(method, path, query) == expected


class Upstream:
    """HTTPS echo server: JSON describing each request; ``?watch=true`` and ``/log`` stream three lines."""

    def __init__(self, directory: Path) -> None:
        self.cert, key = self_signed(directory)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self.cert, key)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.port = 0

    def start(self) -> Upstream:
        threading.Thread(target=self._serve, daemon=True).start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self._tls)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") == "true" or request.path.endswith("/log"):
            response = web.StreamResponse()
            await response.prepare(request)
            for index in range(3):
                await response.write(json.dumps({"type": "ADDED", "index": index}).encode() + b"\n")
                await asyncio.sleep(0.02)
            return response
        if request.path.endswith("/missing"):
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        body = await request.read()
        echo = {
            "method": request.method,
            "path": request.path_qs,
            "body": body.decode(),
            "authorization": request.headers.get("Authorization"),
        }
        return web.json_response(echo)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("upstream")).start()
    yield server
    server.stop()


@pytest.fixture
def proxy(upstream: Upstream, tmp_path: Path) -> Iterator[ApiProxy]:
    with ApiProxy(upstream.url, upstream.cert, tmp_path / "proxy", stall_seconds=0.05) as running:
        yield running


def call(proxy: ApiProxy | ApiProxyProcess, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(proxy.cert))  # the proxy's certificate is valid for 127.0.0.1
    request = urllib.request.Request(proxy.url + path, data=body, method=method)
    request.add_header("Authorization", "Bearer secret-token")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_requests_are_forwarded_and_counted_by_verb_and_resource(proxy: ApiProxy) -> None:
    status, body = call(proxy, "POST", "/apis/batch/v1/namespaces/a/jobs", b'{"kind": "Job"}')
    assert status == 200
    echo = json.loads(body)
    assert echo == {
        "method": "POST",
        "path": "/apis/batch/v1/namespaces/a/jobs",
        "body": '{"kind": "Job"}',
        "authorization": "Bearer secret-token",  # bearer tokens pass through: ServiceAccount kubeconfigs work
    }
    for _ in range(3):
        assert call(proxy, "GET", "/apis/batch/v1/namespaces/a/jobs?labelSelector=x%3Dy")[0] == 200
    assert call(proxy, "PATCH", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x/status", b"{}")[0] == 200
    assert call(proxy, "GET", "/api/v1/namespaces/a/pods/missing")[0] == 404
    status, streamed = call(proxy, "GET", "/apis/batch/v1/namespaces/a/jobs?watch=true")
    assert status == 200 and [json.loads(line)["index"] for line in streamed.splitlines()] == [0, 1, 2]
    status, log = call(proxy, "GET", "/api/v1/namespaces/a/pods/p/log?follow=true")
    assert status == 200 and len(log.splitlines()) == 3
    assert call(proxy, "GET", "/version")[0] == 200

    assert proxy.counts() == {
        "LIST jobs": 3,
        "POST jobs": 1,
        "PATCH dpojobs/status": 1,
        "GET pods": 1,
        "WATCH jobs": 1,
        "GET pods/log": 1,
        "GET /version": 1,
    }
    assert proxy.statuses == {200: 8, 404: 1}
    assert proxy.reset()["LIST jobs"] == 3
    assert proxy.counts() == {} and not proxy.statuses
    call(proxy, "DELETE", "/api/v1/namespaces/a/configmaps/c")
    assert proxy.counts() == {"DELETE configmaps": 1}


def test_faults_are_injected_while_on_and_every_request_still_counts(proxy: ApiProxy) -> None:
    proxy.faults.set()
    outcomes = []
    for _ in range(40):
        try:
            outcomes.append(call(proxy, "GET", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x")[0])
        except (urllib.error.URLError, ConnectionError):
            outcomes.append("dropped")
    proxy.faults.clear()
    assert sum(proxy.injected.values()) == 40
    assert {500, 429, "dropped", 200} <= set(outcomes)
    assert outcomes.count(500) == proxy.injected["500"] and outcomes.count(429) == proxy.injected["429"]
    assert proxy.counts() == {"GET dpojobs": 40}
    assert call(proxy, "GET", "/apis/dpo-operator.io/v1alpha1/namespaces/a/dpojobs/x")[0] == 200
    assert sum(proxy.injected.values()) == 40, "no fault is chosen once they are off"


def test_the_process_form_serves_its_counters_and_a_kubeconfig(upstream: Upstream, tmp_path: Path) -> None:
    source = tmp_path / "sa.kubeconfig"
    ca_data = base64.b64encode(upstream.cert.read_bytes()).decode()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": upstream.url, "certificate-authority-data": ca_data}}],
        "users": [{"name": "u", "user": {"token": "secret-token"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    source.write_text(yaml.safe_dump(kubeconfig))
    assert upstream_of(source, tmp_path / "ca.crt") == upstream.url
    assert (tmp_path / "ca.crt").read_bytes() == upstream.cert.read_bytes()
    with ApiProxyProcess(upstream.url, tmp_path / "ca.crt", tmp_path / "process") as proxy:
        for _ in range(2):
            assert call(proxy, "GET", "/api/v1/namespaces/a/configmaps/c")[0] == 200
        assert call(proxy, "POST", "/api/v1/namespaces/a/events", b"{}")[0] == 200
        assert proxy.counts() == {"GET configmaps": 2, "POST events": 1}, "control requests are not counted"
        assert proxy.reset() == {"GET configmaps": 2, "POST events": 1}
        assert proxy.counts() == {}
        proxied = yaml.safe_load(proxy.kubeconfig(source, tmp_path / "proxied.kubeconfig").read_text())
        assert proxied["clusters"][0]["cluster"]["server"] == proxy.url
        assert proxied["users"] == [{"name": "u", "user": {"token": "secret-token"}}]
        assert (tmp_path / "proxied.kubeconfig").stat().st_mode & 0o077 == 0, "it holds a token"
    assert proxy.process is not None and proxy.process.returncode is not None


def test_write_proxied_kubeconfig_without_a_ca_skips_verification(tmp_path: Path) -> None:
    source = tmp_path / "in.yaml"
    source.write_text(yaml.safe_dump({"clusters": [{"name": "c", "cluster": {"server": "https://10.0.0.1"}}]}))
    written = yaml.safe_load(
        write_proxied_kubeconfig(source, tmp_path / "out.yaml", "https://127.0.0.1:1", None).read_text()
    )
    assert written["clusters"][0]["cluster"] == {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}
