"""The local end-to-end demo: `python -m dpo_dev.demo`.

Starts the embedded control plane (building it once), a simulated GPU node and a local Hub; installs the
operator with `helm install` from charts/ (the simulated node runs its pod); applies examples/quickstart.yaml
(pushing to the local Hub); prints the DPOJob status as it moves through the stages; checks the merged model
arrived in the Hub; tears everything down. The node runs the operator and trainer pods as containers of the
project's images (built or loaded with podman first); where podman cannot run them, the demo says so in one line
and runs them as local processes instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .build import StepError
from .cluster import LocalCluster
from .images import ensure_images, podman_env
from .stack import LocalStack, kubectl, quickstart_for_cluster

NAMESPACE = "demo"


def _line(obj: dict) -> str:
    status = obj.get("status") or {}
    progress = status.get("progress") or {}
    rewards = status.get("rewards") or {}
    parts = [f"phase={status.get('phase', '-')}", f"stage={status.get('stage', '-')}"]
    if progress:
        parts.append(f"step={progress.get('step')}/{progress.get('totalSteps')} ({progress.get('percent')}%)")
        if progress.get("eta"):
            parts.append(f"eta={progress['eta']}")
    parts += [f"{k}={v:.4f}" for k, v in sorted(rewards.items())]
    return "  ".join(parts)


def container_problem() -> str | None:
    """Why pods cannot run as containers here (one line), or None; builds or loads the images on the way."""
    try:
        operator = ensure_images(lambda m: print(f"[images] {m}", flush=True))["dpo-operator"].name
        smoke = ["podman", "run", "--rm", "--pull=never", "--network=host", "--entrypoint=true", operator]
        result = subprocess.run(smoke, env=podman_env(), capture_output=True, text=True, timeout=120)
    except (StepError, OSError, subprocess.TimeoutExpired) as exc:
        return str(exc).strip().splitlines()[0]
    if result.returncode != 0:
        return "podman run failed: " + (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
    return None


def run(timeout: float, workdir: Path | None, mode: str) -> int:
    started = time.monotonic()
    if mode == "container" and (problem := container_problem()) is not None:
        print(f"[demo] containers cannot run here ({problem}): running the pods as local processes", flush=True)
        mode = "process"
    with LocalCluster(progress=lambda m: print(f"[cluster] {m}", flush=True)) as cluster:
        print(f"[demo] control plane up at {cluster.server} ({time.monotonic() - started:.0f}s)", flush=True)
        print("[demo] helm install dpo-operator charts/dpo-operator -n dpo-operator-system --wait", flush=True)
        with LocalStack(cluster.kubeconfig, workdir, mode=mode) as stack:
            pods = ", ".join(p["metadata"]["name"] for p in stack.operator.pods())
            where = "containers (podman)" if mode == "container" else "local processes"
            elapsed = time.monotonic() - started
            print(f"[demo] operator running in-cluster ({pods}, {elapsed:.0f}s); pods run as {where}", flush=True)
            stack.create_token_secret(NAMESPACE)
            document = quickstart_for_cluster(NAMESPACE)
            print("[demo] kubectl apply -f - <<EOF\n" + yaml.safe_dump(document, sort_keys=False) + "EOF", flush=True)
            kubectl(cluster.kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump(document))
            name, last, deadline = document["metadata"]["name"], "", time.monotonic() + timeout
            obj: dict = {}
            while time.monotonic() < deadline:
                obj = stack.get_dpojob(NAMESPACE, name)
                if (line := _line(obj)) != last:
                    print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)
                    last = line
                if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    break
                time.sleep(1)
            print(kubectl(cluster.kubeconfig, "-n", NAMESPACE, "get", "dpo"), flush=True)
            print(kubectl(cluster.kubeconfig, "-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"))
            status = obj.get("status") or {}
            if status.get("phase") != "Succeeded":
                print(f"[demo] FAILED: {status.get('conditions')}", file=sys.stderr)
                return 1
            model = status["model"]
            from huggingface_hub import HfApi

            files = HfApi(endpoint=stack.hub.url, token=stack.hub_token).list_repo_files(model["repoId"])
            print(f"[demo] metrics: {yaml.safe_dump(status.get('metrics'), default_flow_style=True).strip()}")
            print(f"[demo] model pushed: {model.get('commitUrl')} ({len(files)} files: {', '.join(sorted(files))})")
            for field in ("preflight", "efficiency", "provenance"):  # the summary arrives with the trainer's last line
                obj = stack.wait_for(NAMESPACE, name, lambda o, f=field: f in (o.get("status") or {}), 60)
                shown = yaml.safe_dump(obj["status"][field], default_flow_style=True, width=110).strip()
                print(f"[demo] {field}: {shown}")
            print(f"[demo] done in {time.monotonic() - started:.0f}s")
            return 0 if "model.safetensors" in files and "README.md" in files else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="dpo-demo", description=__doc__)
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the DPOJob")
    parser.add_argument("--workdir", type=Path, default=None, help="keep hub, node and operator files here")
    parser.add_argument(
        "--mode",
        choices=("container", "process"),
        default="container",
        help="run pods as containers of the images (falls back to process when podman cannot) or as processes",
    )
    args = parser.parse_args()
    sys.exit(run(args.timeout, args.workdir, args.mode))


if __name__ == "__main__":
    main()
