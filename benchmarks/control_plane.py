"""Benchmark the local control plane: warm start time, resident memory, and (with --cold) build + start.

    .venv/bin/python benchmarks/control_plane.py                 # warm start x3 + RSS (binaries cached)
    .venv/bin/python benchmarks/control_plane.py --cold          # + fetch/build into a fresh cache dir first

Prints one JSON object (seconds, MiB); docs/benchmarks.md quotes its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dpo_dev.build import ensure_binaries
from dpo_dev.cluster import LocalCluster
from dpo_dev.nodesim import NodeSimulator, NodeSpec


def rss_mib(pid: int) -> float:
    """Resident set size of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true", help="first build into a fresh, empty cache dir")
    parser.add_argument("--starts", type=int, default=3, help="warm starts to time (default: %(default)s)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds idle before reading RSS")
    args = parser.parse_args()
    result: dict[str, object] = {"cpus": os.cpu_count()}

    if args.cold:
        cache = Path(tempfile.mkdtemp(prefix="dpo-cold-cache-"))
        started = time.monotonic()
        binaries = ensure_binaries(cache, progress=lambda m: print(f"[cold] {m}", file=sys.stderr, flush=True))
        result["cold_build_s"] = round(time.monotonic() - started, 1)
        result["cold_cache_dir"] = str(cache)
    else:
        binaries = ensure_binaries()

    starts = []
    for _ in range(args.starts):
        cluster = LocalCluster(binaries=binaries)
        started = time.monotonic()
        cluster.start()
        starts.append(time.monotonic() - started)
        cluster.stop()
    result["warm_start_s"] = {"median": round(statistics.median(starts), 2), "all": [round(s, 2) for s in starts]}
    if args.cold:
        result["cold_build_plus_start_s"] = round(result["cold_build_s"] + starts[0], 1)  # type: ignore[operator]

    with LocalCluster(binaries=binaries) as cluster:
        simulator = NodeSimulator(cluster.kubeconfig, [NodeSpec("bench-gpu-0", gpus=1)]).start()
        try:
            time.sleep(args.settle)
            per_component = {name: round(rss_mib(pid), 1) for name, pid in cluster.pids().items()}
            result["rss_mib"] = {
                **per_component,
                "control_plane_total": round(sum(per_component.values()), 1),
                "this_process_with_node_simulator": round(rss_mib(os.getpid()), 1),
            }
        finally:
            simulator.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
