"""Overhead of `dpo-trainer run` over a bare TRL script doing the same SFT → merge → DPO → merge.

    .venv/bin/python benchmarks/trainer_overhead.py              # 1 warm-up + 3 timed runs of each
    .venv/bin/python benchmarks/trainer_overhead.py --runs 5 --warmup 0

Both sides train examples/quickstart.yaml's tiny Llama on its bundled data with the same hyperparameters
(read from that file: LoRA, 4-bit NF4, max steps, eval/save cadence, seed), each run in a fresh subprocess
with OMP_NUM_THREADS=1 and HF_HUB_OFFLINE=1, alternating which side goes first in each round. The bare
script (benchmarks/bare_trl.py) uses datasets, SFTTrainer, DPOTrainer and PEFT directly, in one process, with
every import at the top; it does what our data, sft, sft_merge, dpo and dpo_merge stages do, and nothing
of what is ours alone (progress events, resumable state, model card, summary). Measured per run:

    wall_s      the whole subprocess, interpreter start to exit
    cpu_s       CPU seconds (user + system) the subprocess used: what it costs, little moved by other load
    train_s     the sum of the Trainer's own train_runtime for SFT and DPO (inside trainer.train():
                steps, evaluations, checkpoint saves), i.e. training only, no imports or model loading

Prints one JSON object: medians, ratios ours/bare (goal ≤ 1.05 for wall time), every run, our per-stage
times, the load average, and whether both sides ended with the same final DPO metrics (same seed, same
data order, same steps: they should).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bare_trl
import yaml

from dpojob_api.spec import DPOJobSpec

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
COMPARED_METRICS = ("loss", "rewards/margins", "rewards/accuracies", "eval_loss")


def quickstart_in(work: Path) -> tuple[Path, DPOJobSpec]:
    """A copy of the quickstart whose inputs are absolute and whose outputs all lie under `work`."""
    document = yaml.safe_load(QUICKSTART.read_text())
    spec = document["spec"]
    spec["model"]["name"] = str(REPO / spec["model"]["name"])
    for stage in ("sft", "dpo"):
        files = spec["data"][stage]["source"]["files"]
        files["paths"] = [str(REPO / p) for p in files["paths"]]
    spec["output"]["directory"] = str(work / "model-out")
    spec["checkpointing"]["directory"] = str(work / "work")
    path = work / "quickstart.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path, DPOJobSpec.model_validate(spec)


def timed(command: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Run one subprocess (stdout to cwd/stdout.log, stderr to cwd/stderr.log): its start and end (Unix time) and
    the CPU seconds it used (user + system, its children included): unlike wall time, hardly moved by other load."""
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | ENV | (extra_env or {})
    with (cwd / "stdout.log").open("w") as out, (cwd / "stderr.log").open("w") as err:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.time()
        subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=err, check=True)
        ended = time.time()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return started, ended, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def train_runtime(history: list[dict[str, Any]]) -> float:
    """The Trainer's own timing of trainer.train(), from the summary entry it appends to its log history."""
    return next(e["train_runtime"] for e in history if "train_runtime" in e)


def final_dpo_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last training and the last evaluation log of a DPO run, for the same-result check."""
    metrics: dict[str, float] = {}
    for entry in history:
        if "loss" in entry or "eval_loss" in entry:
            metrics.update({k: entry[k] for k in COMPARED_METRICS if k in entry})
    return metrics


def run_ours(root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ours-", dir=root))
    spec_path, _ = quickstart_in(work)
    cli = Path(sys.executable).with_name("dpo-trainer")
    command = [str(cli), "run", str(spec_path), "--output", str(work / "work")]
    started, ended, cpu = timed(command, work, {"DPO_TERMINATION_MESSAGE_PATH": str(work / "termination-log")})
    events = [json.loads(line) for line in (work / "stdout.log").read_text().splitlines()]
    summary = json.loads((work / "work" / "summary.json").read_text())
    histories = {s: json.loads((work / "work" / s / "log_history.json").read_text()) for s in ("sft", "dpo")}
    stages = {name: t["seconds"] for name, t in summary["stages"].items()}
    phases = {
        "start_to_first_event": events[0]["time"] - started,
        **{f"stage:{name}": seconds for name, seconds in stages.items()},
        "done_event_to_exit": ended - events[-1]["time"],
    }
    phases["between_stages"] = ended - started - sum(phases.values())
    return {
        "wall_s": ended - started,
        "cpu_s": cpu,
        "train_s": sum(train_runtime(h) for h in histories.values()),
        "phases_s": phases,
        "final": final_dpo_metrics(histories["dpo"]),
    }


def run_bare(root: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bare-", dir=root))
    _, spec = quickstart_in(work)
    config = work / "bare.json"
    config.write_text(json.dumps(bare_trl.config(spec, str(work / "out"))))
    script = work / "bare_trl.py"
    script.write_text(bare_trl.SCRIPT)
    started, ended, cpu = timed([sys.executable, str(script), str(config)], work)
    result = json.loads((work / "out" / "bare_result.json").read_text())
    times = result["times"]
    return {
        "wall_s": ended - started,
        "cpu_s": cpu,
        "train_s": train_runtime(result["sft_log_history"]) + train_runtime(result["dpo_log_history"]),
        "phases_s": {
            "interpreter_start": times["started"] - started,
            "imports": times["imported"] - times["started"],
            "work": times["finished"] - times["imported"],
            "end_to_exit": ended - times["finished"],
        },
        "final": final_dpo_metrics(result["dpo_log_history"]),
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def summarize(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    values = [r[key] for r in runs]
    return {"median": median(values), "all": [round(v, 2) for v in values]}


def phase_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {phase: median([r["phases_s"][phase] for r in runs]) for phase in runs[0]["phases_s"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each side first (page cache)")
    args = parser.parse_args()
    runners = {"ours": run_ours, "bare": run_bare}
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "bare": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dpo-overhead-") as tmp:
        root = Path(tmp)
        for round_ in range(args.warmup + args.runs):
            order = ("ours", "bare") if round_ % 2 == 0 else ("bare", "ours")
            for side in order:
                outcome = runners[side](root)
                print(f"[round {round_}] {side}: {outcome['wall_s']:.1f} s", file=sys.stderr, flush=True)
                if round_ >= args.warmup:
                    results[side].append(outcome)
    ours, bare = results["ours"], results["bare"]
    report = {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "runs": args.runs,
        "wall_s": {"ours": summarize(ours, "wall_s"), "bare": summarize(bare, "wall_s")},
        "cpu_s": {"ours": summarize(ours, "cpu_s"), "bare": summarize(bare, "cpu_s")},
        "train_s": {"ours": summarize(ours, "train_s"), "bare": summarize(bare, "train_s")},
        "ratio_wall": round(summarize(ours, "wall_s")["median"] / summarize(bare, "wall_s")["median"], 3),
        # Each round's two runs share the machine's load at that time; the median of their ratios resists drift.
        "ratio_wall_paired": median([o["wall_s"] / b["wall_s"] for o, b in zip(ours, bare, strict=True)]),
        "ratio_cpu": round(summarize(ours, "cpu_s")["median"] / summarize(bare, "cpu_s")["median"], 3),
        "ratio_train": round(summarize(ours, "train_s")["median"] / summarize(bare, "train_s")["median"], 3),
        "phases_s": {"ours": phase_medians(ours), "bare": phase_medians(bare)},
        "same_final_dpo_metrics": all(r["final"] == ours[0]["final"] for r in ours + bare),
        "final_dpo_metrics": {"ours": ours[0]["final"], "bare": bare[0]["final"]},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
