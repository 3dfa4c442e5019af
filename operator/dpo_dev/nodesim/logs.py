"""Container logs as CRI-like files, one per attempt ("<time> stdout <F|P> <content>" records, as containerd
writes them), and the termination message a kubelet reports."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

from .model import _now_micro

TERMINATION_MESSAGE_MAX = 4096  # kubelet's per-container cap
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048  # kubelet's FallbackToLogsOnError tail
LOG_LINE_MAX = 16 * 1024  # containerd's maximum log line: longer ones become partial records


class LogFile:
    """One container attempt's log; ``finished`` ends follow streams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.finished = threading.Event()
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    def write(self, content: bytes, stream: str = "stdout") -> None:
        """Append one record: a line with its newline (F), or a partial line without (P)."""
        full = content.endswith(b"\n")
        record = f"{_now_micro()} {stream} {'F' if full else 'P'} ".encode() + content.rstrip(b"\n") + b"\n"
        with self._lock, self.path.open("ab") as out:
            out.write(record)

    def pump(self, pipe: IO[bytes], stream: str) -> None:
        """Copy a process's output stream line by line, as the container runtime does (lines over 16 KiB are
        split into partial records), so stdout lines never mix with, e.g., stderr progress bars."""
        for line in iter(lambda: pipe.readline(LOG_LINE_MAX), b""):
            self.write(line, stream)

    def read_tail(self, max_lines: int, max_bytes: int) -> str:
        lines = [_parse_record(r)[1] for r in _split_records(self.path.read_bytes())[0]]
        text = b"".join(lines[-max_lines:])[-max_bytes:]
        return text.decode(errors="replace")


def _split_records(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete records (newline-terminated) and the unfinished rest. Only \\n ends a record: a \\r inside
    a line (progress bars) must not split it, so bytes.splitlines() is not usable here."""
    *records, rest = data.split(b"\n")
    return [r + b"\n" for r in records], rest


def _parse_record(record: bytes) -> tuple[str, bytes]:
    """(timestamp, content as the container wrote it) from one stored log record."""
    parts = record.rstrip(b"\n").split(b" ", 3)
    stamp, _stream, tag, content = parts + [b""] * (4 - len(parts))
    return stamp.decode(), content + (b"\n" if tag == b"F" else b"")


def _termination_message(spec: dict, path: Path, exit_code: int, logfile: LogFile) -> str:
    """The file at terminationMessagePath (capped as the kubelet caps it), or with FallbackToLogsOnError the
    log's tail when the container failed without writing one."""
    message = path.read_bytes()[:TERMINATION_MESSAGE_MAX].decode(errors="replace")
    if not message and exit_code != 0 and spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
        message = logfile.read_tail(FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES)
    return message
