"""``python -m dpo_dev.hub``: a LocalHub served standalone."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from .server import LocalHub


def main(argv: list[str] | None = None) -> None:
    """Serve a LocalHub until SIGINT/SIGTERM (the local demo runs it standalone)."""
    parser = argparse.ArgumentParser(prog="python -m dpo_dev.hub", description=main.__doc__)
    parser.add_argument("--root", required=True, type=Path, help="directory holding repos and objects")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", action="append", required=True, help="an accepted token (repeatable)")
    parser.add_argument("--user", default="local", help="user name the tokens belong to")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    with LocalHub(args.root, args.token, args.host, args.port, user=args.user) as hub:
        print(f"LocalHub serving {args.root} at {hub.url}", flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
