"""Child processes of the local stack: each in its own session (so its process group holds whatever it forks),
dying with the process that started it, stopped by PID (also from another process); free ports for them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the thread that started it dies (e.g. the parent is killed)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(argv: list[str], log: Path, *, cwd: Path | None = None) -> subprocess.Popen:
    """Start a child in its own session, output to ``log``; it dies with us when started from the main thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, so it is only armed from the main thread.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )


def terminate(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM all, then SIGKILL whatever still runs after ``grace`` seconds; reaps them."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def processes_in_groups(groups: list[int] | set[int]) -> list[int]:
    """PIDs of live processes whose process group is one of ``groups`` (leak checks: we start each child
    as a session/group leader, so its group id is its PID and holds anything it forked)."""
    wanted, found = set(groups), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in wanted:
            found.append(int(stat.parent.name))
    return found


def pid_alive(pid: int) -> bool:
    """Whether a PID names a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid_runs(pid: int, executable: str) -> bool:
    """Whether ``pid`` still runs ``executable`` (guards against killing a recycled PID)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return False
    return pid_alive(pid) and Path(argv0).name == Path(executable).name


def kill_pid(pid: int, executable: str, grace: float = 10.0) -> None:
    """Stop a process we did not fork (recorded in a state file): SIGTERM, then SIGKILL."""
    if not _pid_runs(pid, executable):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()
