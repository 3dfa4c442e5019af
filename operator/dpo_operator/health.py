"""Health and metrics endpoints: /healthz, /readyz, /metrics on one port, served from a thread of its own.

Why not Kopf's liveness endpoint: a standby replica waits for the leader Lease before Kopf even starts and
must still answer its probes, and the loops that matter (Kopf's event loop, the workers, the resync, the log
followers, the Lease renewal) live in different threads. Each loop registers here and beats; /healthz fails, naming the
loop, when a loop's thread has died or it has not beaten within its allowance, so the kubelet restarts a
replica whose background work stopped instead of leaving it green.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import REGISTRY

log = logging.getLogger(__name__)


@dataclass
class _Loop:
    thread: threading.Thread | None
    max_silence: float
    last_beat: float


class Health:
    """The registered loops and whether the operator is ready (leading, or a healthy standby)."""

    def __init__(self) -> None:
        self._loops: dict[str, _Loop] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def register(self, name: str, max_silence: float, thread: threading.Thread | None = None) -> None:
        """Watch a loop: unhealthy if `thread` (default: the caller's) dies or no beat comes for max_silence s."""
        with self._lock:
            self._loops[name] = _Loop(thread or threading.current_thread(), max_silence, time.monotonic())

    def unregister(self, name: str) -> None:
        with self._lock:
            self._loops.pop(name, None)

    def beat(self, name: str) -> None:
        with self._lock:
            if name in self._loops:
                self._loops[name].last_beat = time.monotonic()

    def problems(self) -> list[str]:
        """What is wrong, one line per dead or silent loop; empty when healthy."""
        now = time.monotonic()
        with self._lock:
            loops = dict(self._loops)
        found = []
        for name, loop in sorted(loops.items()):
            if loop.thread is not None and not loop.thread.is_alive():
                found.append(f"{name}: its thread has exited")
            elif now - loop.last_beat > loop.max_silence:
                found.append(f"{name}: no progress for {now - loop.last_beat:.0f}s (allowed {loop.max_silence:.0f}s)")
        return found


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds: keep the log quiet
        return

    def do_GET(self) -> None:
        health = self.server.health
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            problems = health.problems()
            if path == "/readyz" and not problems and not health.ready.is_set():
                problems = ["starting"]
            body = json.dumps({"ok": not problems, "problems": problems}).encode()
            self._send(500 if problems else 200, body, "application/json")
        else:
            self._send(404, b"not found\n", "text/plain")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], health: Health) -> None:
        super().__init__(address, _Handler)
        self.health = health


def serve(health: Health, address: str, port: int) -> _Server:
    """Start the endpoint in a daemon thread; returns the server (server_address has the bound port)."""
    server = _Server((address, port), health)
    threading.Thread(target=server.serve_forever, name="dpo-health", daemon=True).start()
    log.info("serving /healthz, /readyz and /metrics on http://%s:%d", *server.server_address[:2])
    return server
