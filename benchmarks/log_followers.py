"""Operator memory per open TLS log stream: the log followers against aiohttp on asyncio's own TLS transport.

    .venv/bin/python benchmarks/log_followers.py [--streams 1000]

One TLS server process (a stand-in for the API server's pod-log endpoint: each GET answers one progress line,
then holds the stream open) and, one after the other, two fresh client processes that each open `--streams`
log streams and wait until every stream has delivered its line:

- **followers**: `dpo_operator.followers.LogFollowers` on an event loop (as on Kopf's): h11 over asyncio streams,
  TLS in memory (ssl.MemoryBIO).
- **aiohttp (baseline)**: one aiohttp ClientSession, a GET per stream, on asyncio's TLS transport: what the
  followers used before, without their private buffer change.

Each client reports its RSS before the first stream and with every stream open; the difference per stream and
the ratio (followers / baseline) are printed. Results: docs/benchmarks.md, "Log followers".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROGRESS = b'{"kind": "dpo-trainer/progress", "event": "log", "stage": "dpo", "step": 1, "time": 1000.0}\n'


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def make_pki(directory: Path) -> None:
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
    openssl("req", "-x509", "-new", "-key", "ca.key", "-days", "1", "-subj", "/CN=ca", "-out", "ca.crt")
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "server.key")
    openssl("req", "-new", "-key", "server.key", "-subj", "/CN=kube-apiserver", "-out", "server.csr")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "server.ext", "-out", "server.crt")  # fmt: skip


async def serve(pki: Path) -> None:
    """Answer every request with a chunked stream: one progress line, then nothing until the client leaves."""
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pki / "server.crt", pki / "server.key")

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (len(PROGRESS), PROGRESS)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
            await writer.drain()
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(one, "127.0.0.1", 0, ssl=tls, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def client_followers(url: str, pki: Path, streams: int) -> dict[str, float]:
    from kubernetes import client

    from dpo_operator.followers import LogFollowers

    configuration = client.Configuration(host=url)
    configuration.ssl_ca_cert = str(pki / "ca.crt")
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    while not loop.is_running():
        time.sleep(0.01)
    followers = LogFollowers(object(), lambda namespace, name: None, max_streams=streams, configuration=configuration)
    followers.attach(loop)
    before = rss_mib()
    pods = [
        {
            "metadata": {"name": f"pod-{i}", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "status": {
                "phase": "Running",
                "containerStatuses": [{"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}],
            },
        }
        for i in range(streams)
    ]
    followers.ensure("ns", "job", pods)
    deadline = time.monotonic() + 300
    while sum(f.progress.step == 1 for f in followers._followers.values()) < streams:
        assert time.monotonic() < deadline, "not every stream delivered its line"
        time.sleep(0.2)
    assert followers.open_streams() == streams
    time.sleep(1.0)
    return {"before": before, "open": rss_mib()}


def client_aiohttp(url: str, pki: Path, streams: int) -> dict[str, float]:
    import aiohttp

    async def main() -> dict[str, float]:
        tls = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        before = rss_mib()
        delivered = asyncio.Event()
        count = 0
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ssl=tls))

        async def one(i: int) -> None:
            nonlocal count
            async with session.get(f"{url}/api/v1/namespaces/ns/pods/pod-{i}/log") as response:
                async for _ in response.content.iter_any():
                    count += 1
                    if count == streams:
                        delivered.set()

        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        await asyncio.wait_for(delivered.wait(), 300)
        await asyncio.sleep(1.0)
        result = {"before": before, "open": rss_mib()}
        for task in tasks:
            task.cancel()
        await session.close()
        return result

    return asyncio.run(main())


CLIENTS = {"followers": client_followers, "aiohttp": client_aiohttp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--pki", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    if args.client:
        print(json.dumps(CLIENTS[args.client](args.url, args.pki, args.streams)))
        return
    with tempfile.TemporaryDirectory() as directory:
        pki = Path(directory)
        make_pki(pki)
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(pki)], stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            url = f"https://127.0.0.1:{server.stdout.readline().strip()}"
            results = {}
            for name in ("aiohttp", "followers"):
                command = [sys.executable, __file__, "--client", name, "--url", url, "--pki", str(pki)]
                out = subprocess.run([*command, "--streams", str(args.streams)], check=True, capture_output=True)
                results[name] = json.loads(out.stdout.decode().strip().splitlines()[-1])
        finally:
            server.terminate()
            server.wait()
    per_stream = {name: (r["open"] - r["before"]) * 1024 / args.streams for name, r in results.items()}
    print(f"{args.streams} TLS log streams open, operator-side memory (RSS):")
    for name, r in results.items():
        label = "aiohttp on asyncio TLS (baseline)" if name == "aiohttp" else "log followers (h11, ssl.MemoryBIO)"
        print(
            f"  {label:40s} {r['before']:7.1f} -> {r['open']:7.1f} MiB: "
            f"{r['open'] - r['before']:6.1f} MiB, {per_stream[name]:5.1f} KiB per stream"
        )
    print(f"  ratio followers / baseline: {per_stream['followers'] / per_stream['aiohttp']:.2f}x")


if __name__ == "__main__":
    main()
