"""What the trainer's preflight costs the quickstart: each check timed, against the whole quickstart run.

    .venv/bin/python benchmarks/preflight_cost.py [--runs 3]

A LocalHub serves the Hub API; the quickstart spec (examples/quickstart.yaml) gets an output.hub repo, so every
check runs: the writable work and output directories, the sources' read access (local files here: nothing to
ask), the GPU-memory estimate (config.json, the meta-device parameter count), the token's write access to the
target namespace and the run's tag (whoami, auth-check, refs), and the provenance record. Each run times the
checks in this process (the functions pipeline.run calls, in its order), then the whole quickstart as
`dpo-trainer run` in a subprocess (the baseline: what a user waits for). Results: docs/benchmarks.md, "Preflight".
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "0" * 32


def spec_file(work: Path, repo_id: str) -> Path:
    document = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    document["spec"]["output"].update(directory=str(work / "model"), hub={"repoId": repo_id})
    document["spec"]["checkpointing"]["directory"] = str(work / "work")
    path = work / "dpojob.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def time_checks(path: Path, work: Path) -> dict[str, float]:
    from dpo_trainer import hub, preflight, provenance
    from dpo_trainer.context import RunContext, RunState
    from dpo_trainer.layout import RunLayout
    from dpo_trainer.progress import Reporter
    from dpo_trainer.specfile import load_job

    spec = load_job(path).spec
    out_dir = work / "work"
    timings: dict[str, float] = {}

    def timed(name: str, call, *args):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        result = call(*args)
        timings[name] = time.perf_counter() - started
        return result

    timed("check_writable", preflight.check_writable, spec, out_dir)
    layout = RunLayout(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(spec, layout, Reporter(io.StringIO()), TOKEN, RunState.load(layout.state), {})
    timed("check_sources", hub.check_sources, spec, TOKEN)
    timed("memory estimate", preflight.check, spec, TOKEN)
    timed("check_token", hub.check_token, ctx)
    timed("provenance", provenance.record, ctx)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from dpo_dev.hub import LocalHub

    checks: list[dict[str, float]] = []
    quickstart: list[float] = []
    with tempfile.TemporaryDirectory() as directory, LocalHub(Path(directory) / "hub", {TOKEN: "demo"}) as local:
        os.environ.update(HF_ENDPOINT=local.url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        for run in range(args.runs):
            work = Path(directory) / f"run-{run}"
            work.mkdir()
            path = spec_file(work, f"demo/preflight-{run}")
            checks.append(time_checks(path, Path(directory) / f"checks-{run}"))
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "dpo_trainer.cli", "run", str(path), "--output", str(work / "work")],
                check=True,
                capture_output=True,
                cwd=REPO,
                env=os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
            )
            quickstart.append(time.perf_counter() - started)
    total = [sum(c.values()) for c in checks]
    print(f"preflight checks, median of {args.runs} runs (seconds):")
    for name in checks[0]:
        print(f"  {name:16s} {statistics.median(c[name] for c in checks):7.3f}")
    print(f"  {'all':16s} {statistics.median(total):7.3f}")
    print(f"quickstart (dpo-trainer run, with the push), median: {statistics.median(quickstart):.2f} s")
    print(f"preflight / quickstart: {statistics.median(total) / statistics.median(quickstart):.3f}")


if __name__ == "__main__":
    main()
