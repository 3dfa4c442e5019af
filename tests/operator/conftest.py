"""Fixtures of the operator tests that need no cluster."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest


@pytest.fixture
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A TCP server that accepts every connection and never answers (an API server hung behind live sockets):
    its URL, and the connections it accepted so far."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the listener is shut down at teardown
            while True:
                connections.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", connections
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
    listener.close()
    for connection in connections:
        connection.close()
