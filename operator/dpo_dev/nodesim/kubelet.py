"""The kubelet's HTTPS endpoint, for the container logs: the apiserver proxies ``kubectl logs [-f]`` and
``read_namespaced_pod_log(follow=True)`` to /containerLogs, which streams a runner's LogFile."""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import ssl
import subprocess
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlparse

from .logs import LogFile, _parse_record, _split_records
from .model import _parse_time

if TYPE_CHECKING:
    from .simulator import NodeSimulator

log = logging.getLogger(__name__)


class _TLSServer(ThreadingHTTPServer):
    """HTTPS with the TLS handshake in the request thread (a slow client can't block accept)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext, sim: NodeSimulator):
        super().__init__(address, handler)
        self.context = context
        self.sim = sim

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.do_handshake()
        except (OSError, ssl.SSLError):
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("nodesim: kubelet endpoint error for %s", client_address, exc_info=True)


class _KubeletHandler(BaseHTTPRequestHandler):
    """GET /containerLogs/{namespace}/{pod}/{container}: what the apiserver proxies ``kubectl logs`` to."""

    server: _TLSServer
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes: simplest for follow streams

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("nodesim kubelet: " + format, *args)

    def _error(self, code: int, message: str) -> None:
        body = message.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._error(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._error(404, f"not found: {url.path}")
            return
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        _, namespace, pod, name = parts
        runner = self.server.sim.runner(namespace, pod)
        container = runner.container(name) if runner else None
        if runner is None or container is None:
            self._error(404, f'container "{name}" in pod "{pod}" not found in namespace "{namespace}"')
            return
        previous = query.get("previous") == "true"
        attempts = container.logs[:-1] if previous else container.logs
        if not attempts:
            reason = container.state.get("waiting", {}).get("reason", "ContainerCreating")
            if previous:
                self._error(400, f'previous terminated container "{name}" in pod "{pod}" not found')
            else:
                self._error(400, f'container "{name}" in pod "{pod}" is waiting to start: {reason}')
            return
        self._stream(attempts[-1], query, follow=query.get("follow") == "true" and not previous)

    def _stream(self, logfile: LogFile, query: dict[str, str], follow: bool) -> None:
        since: dt.datetime | None = None
        try:
            if "sinceTime" in query:
                since = _parse_time(query["sinceTime"])
            elif "sinceSeconds" in query:
                since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=int(query["sinceSeconds"]))
            tail_lines = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError as exc:
            self._error(400, str(exc))
            return
        timestamps = query.get("timestamps") == "true"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        sent = 0

        def emit(records: list[bytes]) -> bool:
            nonlocal sent
            out = bytearray()
            for record in records:
                stamp, content = _parse_record(record)
                if since is not None and _parse_time(stamp) < since:
                    continue
                out += (stamp.encode() + b" " if timestamps else b"") + content
            if limit is not None:
                out = out[: max(0, limit - sent)]
            if out:
                self.wfile.write(out)
                self.wfile.flush()
                sent += len(out)
            return limit is None or sent < limit

        try:
            with logfile.path.open("rb") as handle:
                records, partial = _split_records(handle.read())
                if tail_lines is not None:
                    records = records[-tail_lines:] if tail_lines > 0 else []
                if not emit(records) or not follow:
                    return
                while True:
                    finished = logfile.finished.is_set()  # read after the flag: nothing is lost at the end
                    chunk = handle.read()
                    if chunk:
                        records, partial = _split_records(partial + chunk)
                        if not emit(records):
                            return
                    elif finished:
                        return
                    else:
                        logfile.finished.wait(0.1)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return


def _self_signed_cert(directory: Path, address: str) -> tuple[Path, Path]:
    """A throwaway serving cert for the kubelet endpoint (the apiserver does not verify kubelets here)."""
    cert, key = directory / "kubelet.crt", directory / "kubelet.key"
    if not cert.exists():
        directory.mkdir(parents=True, exist_ok=True)
        san = f"IP:{address}" if re.fullmatch(r"[\d.]+|[0-9a-fA-F:]+", address) else f"DNS:{address}"
        command = "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 -subj /CN=nodesim"
        subprocess.run(
            ["openssl", *command.split(), "-addext", f"subjectAltName={san}", "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
    return cert, key
