"""Health and metrics endpoints: /healthz, /readyz, /metrics on one port, served on the operator's event loop.

Why not Kopf's liveness endpoint: a standby replica waits for the leader Lease before Kopf even starts and
must still answer its probes (main.py starts this server on the loop first), and the loops that matter (the
event loop, the workers, the resync, the Event posters, the Lease renewal) live in different threads. Each loop
registers here and beats; /healthz fails, naming the loop, when a loop's thread has died or it has not beaten
within its allowance, so the kubelet restarts a replica whose background work stopped instead of leaving it
green. A stalled event loop cannot answer at all: the probe times out, which the kubelet counts as a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

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


IO_TIMEOUT_S = 10.0
"""A connection must deliver its request, and take its answer, within this many seconds each; an idle or slow
client is then closed."""
MAX_CONNECTIONS = 64
"""Open connections at most: a new one beyond closes the oldest, so a flood of idle sockets cannot lock the
kubelet's probes out."""
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class _Server:
    """The endpoint, on the operator's event loop (however many clients: an idle connection costs a socket,
    not a thread, and is closed after its timeout)."""

    def __init__(self, health: Health, timeout: float, max_connections: int) -> None:
        self.health, self.timeout, self.max_connections = health, timeout, max_connections
        self.server_address: tuple[str, int] = ("", 0)
        self._connections: dict[asyncio.StreamWriter, None] = {}
        """Open connections, oldest first."""
        self._server: asyncio.Server | None = None

    async def start(self, sock: socket.socket) -> None:
        self.server_address = sock.getsockname()
        self._server = await asyncio.start_server(self._serve_one, sock=sock, limit=16 * 1024)

    def close(self) -> None:
        """Close the listening socket and every connection (on the loop)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection (HTTP/1.0 style), each step within the timeout."""
        self._connections[writer] = None
        if len(self._connections) > self.max_connections:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.transport.abort()  # its own handler ends with a reset
        writer.transport.set_write_buffer_limits(high=0)  # drain() returns once everything is sent
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
            code, body, content_type = self._answer(head.split(b"\r\n", 1)[0].decode("latin-1").split())
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # an idle, slow, evicted or garbled client: nothing to answer
        finally:
            self._connections.pop(writer, None)
            writer.transport.abort()

    def _answer(self, request_line: list[str]) -> tuple[int, bytes, str]:
        if len(request_line) != 3:
            return 400, b"bad request\n", "text/plain"
        method, target, _ = request_line
        if method != "GET":
            return 405, b"only GET\n", "text/plain"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            return 200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST
        if path in ("/healthz", "/readyz"):
            problems = self.health.problems()
            if path == "/readyz" and not problems and not self.health.ready.is_set():
                problems = ["starting"]
            body = json.dumps({"ok": not problems, "problems": problems}).encode()
            return 500 if problems else 200, body, "application/json"
        return 404, b"not found\n", "text/plain"


async def serve(
    health: Health,
    address: str,
    port: int,
    timeout: float = IO_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> _Server:
    """Serve the endpoint on the running event loop; returns the server (server_address has the bound port)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server = _Server(health, timeout, max_connections)
    await server.start(socket.create_server((address, port), family=family))
    log.info("serving /healthz, /readyz and /metrics on http://%s:%d", *server.server_address[:2])
    return server
