"""``dpo-localcluster``: build, start and stop the local control plane (plus a node simulator) for demos.

Commands (``--name`` picks an independent cluster; state lives in ``<cache>/run/<name>/``):

    dpo-localcluster build                 fetch + build the binaries and helm into the cache (idempotent)
    dpo-localcluster up [--detach]         start etcd, apiserver, controller-manager, scheduler and a node
                                           simulator; foreground until Ctrl-C/SIGTERM, or detached
    dpo-localcluster down                  stop a running cluster (by the PIDs in its state file)
    dpo-localcluster status                say whether it runs, with its PIDs
    dpo-localcluster env                   print ``export KUBECONFIG=...`` (use with eval)
    dpo-localcluster kubeconfig            print the admin kubeconfig path
    dpo-localcluster sa-kubeconfig NS NAME write a kubeconfig for a ServiceAccount and print its path
    dpo-localcluster images [--no-cache]   build (or reuse) the operator and trainer images with podman
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .build import StepError, cache_dir, ensure_binaries, ensure_helm, tail
from .cluster import LocalCluster, stop_state, write_sa_kubeconfig, write_state
from .images import ensure_images
from .processes import kill_pid, pid_alive

DEFAULT_NODES = ["nodesim-gpu-0:gpus=1,cpu=8,memory=32Gi,label.nvidia.com/gpu.present=true"]


def _say(message: str) -> None:
    print(f"[dpo-localcluster] {message}", file=sys.stderr, flush=True)


def _run_dir(name: str) -> Path:
    return cache_dir() / "run" / name


def _read_state(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((_run_dir(name) / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _running(state: dict[str, Any] | None) -> bool:
    return bool(state) and pid_alive(int(state["supervisor"]["pid"]))


def _own_argv0() -> str:
    return Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()


def cmd_build(_: argparse.Namespace) -> int:
    binaries = ensure_binaries(progress=_say)
    helm = ensure_helm(progress=_say)
    for label, path in (*vars(binaries).items(), ("helm", helm)):
        print(f"{label}: {path}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from .nodesim import NodeSimConfig, NodeSimulator, parse_node

    run = _run_dir(args.name)
    state = _read_state(args.name)
    if _running(state):
        _say(f"cluster '{args.name}' already runs (supervisor PID {state['supervisor']['pid']}); use `down` first")
        return 1
    if state:  # a supervisor that died without cleaning up: stop its leftovers
        stop_state(state)
    nodes = [parse_node(n) for n in (args.node or DEFAULT_NODES)] if not args.no_nodes else []
    if args.detach:
        return _detach(args, run)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    (run / "state.json").unlink(missing_ok=True)
    for sub in ("cluster", "nodesim"):
        shutil.rmtree(run / sub, ignore_errors=True)
    started = time.monotonic()
    cluster = LocalCluster(run / "cluster", progress=_say)
    simulator = None
    try:
        cluster.start()
        if nodes:
            config = NodeSimConfig(mode=args.mode, workdir=run / "nodesim", cwd=Path(args.cwd))
            simulator = NodeSimulator(cluster.kubeconfig, nodes, config=config).start()
        state = cluster.state() | {
            "supervisor": {"pid": os.getpid(), "executable": _own_argv0()},
            "nodes": [n.name for n in nodes],
        }
        write_state(run / "state.json", state)
        _say(f"ready in {time.monotonic() - started:.1f}s: {cluster.server}")
        _say(f"export KUBECONFIG={cluster.kubeconfig}")
        _say("Ctrl-C (or `dpo-localcluster down`) stops everything")
        while True:
            signal.pause()
    except KeyboardInterrupt:
        return 0
    except StepError as exc:
        _say(str(exc))
        return 1
    finally:
        if simulator is not None:
            simulator.stop()
        cluster.stop()
        (run / "state.json").unlink(missing_ok=True)
        _say("stopped")


def _detach(args: argparse.Namespace, run: Path) -> int:
    """Re-run ``up`` in the background (its own session) and wait until its state file says it is ready."""
    argv = [sys.executable, "-m", "dpo_dev.cluster_cli", "--name", args.name, "up"]
    argv += ["--mode", args.mode, "--cwd", str(Path(args.cwd).resolve())]
    argv += ["--no-nodes"] if args.no_nodes else [a for n in args.node or [] for a in ("--node", n)]
    run.mkdir(parents=True, exist_ok=True)
    log = run / "supervisor.log"
    (run / "state.json").unlink(missing_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    while proc.poll() is None:
        state = _read_state(args.name)
        if state and state["supervisor"]["pid"] == proc.pid:
            print(f"export KUBECONFIG={state['kubeconfig']}")
            _say(f"running in the background (PID {proc.pid}, log {log}); stop with `dpo-localcluster down`")
            return 0
        time.sleep(0.2)
    _say(f"the background cluster exited with status {proc.returncode}:\n{tail(log)}")
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    state = _read_state(args.name)
    if not state:
        _say(f"cluster '{args.name}' is not running")
        return 0
    supervisor = state["supervisor"]
    kill_pid(int(supervisor["pid"]), supervisor["executable"], grace=60)
    stop_state(state)  # whatever the supervisor could not stop
    (_run_dir(args.name) / "state.json").unlink(missing_ok=True)
    _say(f"cluster '{args.name}' stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = _read_state(args.name)
    if not _running(state):
        print(f"cluster '{args.name}': not running")
        return 1
    assert state is not None
    print(f"cluster '{args.name}': running at {state['server']} (kubeconfig {state['kubeconfig']})")
    print(f"  supervisor: PID {state['supervisor']['pid']}; nodes: {', '.join(state['nodes']) or 'none'}")
    for name, proc in state["processes"].items():
        print(f"  {name}: PID {proc['pid']} ({'alive' if pid_alive(int(proc['pid'])) else 'dead'})")
    return 0


def _kubeconfig(args: argparse.Namespace) -> str | None:
    state = _read_state(args.name)
    if not _running(state):
        _say(f"cluster '{args.name}' is not running; start it with `dpo-localcluster up --detach`")
        return None
    assert state is not None
    return state["kubeconfig"]


def cmd_env(args: argparse.Namespace) -> int:
    path = _kubeconfig(args)
    if path:
        print(f"export KUBECONFIG={path}")
    return 0 if path else 1


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    path = _kubeconfig(args)
    if path:
        print(path)
    return 0 if path else 1


def cmd_sa_kubeconfig(args: argparse.Namespace) -> int:
    path = _kubeconfig(args)
    if not path:
        return 1
    out = Path(args.output or _run_dir(args.name) / f"{args.namespace}.{args.sa}.kubeconfig")
    print(write_sa_kubeconfig(Path(path), args.namespace, args.sa, out))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    for info in ensure_images(_say, no_cache=args.no_cache).values():
        print(f"{info.name}: {info.source} in {info.seconds:.0f}s, {info.size / 1e6:.0f} MB, id {info.image_id[:12]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpo-localcluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="default", help="which local cluster (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="fetch and build the control-plane binaries and helm").set_defaults(func=cmd_build)
    up = sub.add_parser("up", help="start the control plane and a node simulator")
    up.add_argument("--detach", action="store_true", help="run in the background; stop with `down`")
    up.add_argument(
        "--node",
        action="append",
        help="NAME[:gpus=N,cpu=C,memory=M,pods=P,label.K=V,taint.K=V:Effect] (repeatable; default: "
        f"{DEFAULT_NODES[0]})",
    )
    up.add_argument("--no-nodes", action="store_true", help="start no node simulator")
    up.add_argument("--mode", choices=("process", "simulate"), default="process", help="how pods run")
    up.add_argument("--cwd", default=".", help="working directory of pod processes (default: here)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the cluster").set_defaults(func=cmd_down)
    sub.add_parser("status", help="is it running?").set_defaults(func=cmd_status)
    sub.add_parser("env", help="print `export KUBECONFIG=...`").set_defaults(func=cmd_env)
    sub.add_parser("kubeconfig", help="print the admin kubeconfig path").set_defaults(func=cmd_kubeconfig)
    sa = sub.add_parser("sa-kubeconfig", help="write a ServiceAccount kubeconfig (TokenRequest)")
    sa.add_argument("namespace")
    sa.add_argument("sa", metavar="name")
    sa.add_argument("-o", "--output", help="where to write it")
    sa.set_defaults(func=cmd_sa_kubeconfig)
    images = sub.add_parser("images", help="build (or reuse) the operator and trainer images with podman")
    images.add_argument("--no-cache", action="store_true", help="rebuild both, ignoring cached archives and layers")
    images.set_defaults(func=cmd_images)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except StepError as exc:
        _say(str(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
