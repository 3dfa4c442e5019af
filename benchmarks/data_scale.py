"""Data stage at scale: time, downloads, disk and memory before the first training step, at two dataset sizes.

    .venv/bin/python benchmarks/data_scale.py --sizes 100000 1000000 [--json results.json] [--baseline-head]

A synthetic clone of lvwerra/stack-exchange-paired (columns qid, question, date, metadata, response_j,
response_k; data/finetune, data/rl and data/evaluation with --sizes rows each, in parquet shards of 100,000 rows
and row groups of 10,000; three adjacent rows share a question, as in the real set) is generated once per size,
vectorized with pyarrow from sentences of the tiny set's vocabulary, and kept in a local Hub under
~/.cache/dpo-operator/data-scale/hub-N as the repo lvwerra/stack-exchange-paired, so the spec uses the
stack-exchange-paired preset unchanged. Question and answer lengths are log-normal (medians about 110 and 80
words, long tails): with the tiny tokenizer about one prompt in six exceeds maxPromptLength 512.

Each size runs `dpo-trainer run` twice, each time with a fresh HF_HOME and work directory, on the tiny Llama of
examples/assets with the recipe's step counts and batch shapes (SFT 500 steps x 4 x 2, packed 1024 tokens; DPO
1000 steps x 4 x 4, maxPromptLength 512), so the data stage plans for the recipe's 4,000 packed sequences and
16,000 pairs:

1. sft: the full recipe, stopped (SIGKILL) once SFT logs its first optimizer step;
2. dpo: the same with sft.enabled false, stopped once DPO logs its first step (the first DPO step of the full
   recipe comes after 500 SFT steps and a merge, which are training, not data, costs).

Measured from process start: seconds to the end of the stage's data stage (data for SFT, dpo_data for DPO) and
to the first step (the JSON progress events on stdout), bytes downloaded (the local Hub's request log: the sizes
of the files it served with GET .../resolve/...), disk written (the work directory plus HF_HOME), peak RSS of the
process tree (psutil, sampled every 0.2 s). Prints one JSON document: per size and run, and the ratio of the
largest size to the smallest.
--baseline-head also runs run 1 at the smallest size with the trainer and API of git HEAD (`git archive`, put
first on PYTHONPATH): the behaviour before the change, when HEAD still has it.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from dpo_dev.hub import LocalHub
from dpo_trainer.layout import DATA_STAGES, RunLayout, TrainingStage

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "examples" / "assets" / "tiny-llama"
TINY_DATA = REPO / "examples" / "assets" / "tiny-stack-exchange.jsonl"
CACHE = Path.home() / ".cache" / "dpo-operator" / "data-scale"
DATASET = "lvwerra/stack-exchange-paired"
TOKEN = "data-scale-token-7c1e"
SPLITS = ("finetune", "rl", "evaluation")
SHARD_ROWS = 100_000
ROW_GROUP_ROWS = 10_000
ROWS_PER_QUESTION = 3
TIMEOUT_S = 1800


# -- the synthetic dataset --


def vocabulary() -> list[str]:
    """The words of the tiny set: tokens the tiny tokenizer knows, as real text's words are known to Llama's."""
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", TINY_DATA.read_text())
    return sorted(set(words))


def sentence_pool(rng: np.random.Generator, words: list[str], count: int = 8192) -> pa.Array:
    """Sentences of 6 to 24 words, the words Zipf-distributed as in prose."""
    weights = 1.0 / np.arange(1, len(words) + 1)
    order = rng.permutation(len(words))
    picks = rng.choice(len(words), size=(count, 24), p=weights / weights.sum())
    lengths = rng.integers(6, 25, size=count)
    return pa.array(
        [" ".join(words[order[i]] for i in row[:n]).capitalize() + "." for row, n in zip(picks, lengths, strict=True)]
    )


def paragraphs(rng: np.random.Generator, pool: pa.Array, count: int, median_sentences: float) -> pa.Array:
    """`count` texts of log-normally many sentences from the pool (at least one), joined by pyarrow."""
    sentences = np.maximum(1, rng.lognormal(math.log(median_sentences), 0.6, size=count).astype(np.int64))
    offsets = np.concatenate(([0], np.cumsum(sentences)))
    picked = pool.take(pa.array(rng.integers(0, len(pool), size=int(offsets[-1]))))
    return pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), picked), " ")


def shard(rng: np.random.Generator, pool: pa.Array, first_row: int, rows: int) -> pa.Table:
    """Rows first_row.. of a split: three adjacent rows share a question (qid), each with its own answer pair."""
    question_of_row = (np.arange(first_row, first_row + rows) // ROWS_PER_QUESTION).astype(np.int64)
    first_question = int(question_of_row[0])
    questions = paragraphs(rng, pool, int(question_of_row[-1]) - first_question + 1, 8)
    qid = pa.array(question_of_row)
    urls = pc.binary_join_element_wise("https://stackoverflow.com/questions/", pc.cast(qid, pa.string()), "")
    days = pa.array([f"2023/{m:02d}/{d:02d}" for m in range(1, 13) for d in range(1, 29)])
    return pa.table(
        {
            "qid": qid,
            "question": questions.take(pa.array(question_of_row - first_question)),
            "date": days.take(pa.array(rng.integers(0, len(days), size=rows))),
            "metadata": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)), urls),
            "response_j": paragraphs(rng, pool, rows, 6),
            "response_k": paragraphs(rng, pool, rows, 5),
        }
    )


def build_dataset(root: Path, rows: int) -> dict[str, int]:
    """The clone with `rows` rows per split in a local Hub store at root (made once); {repo path: size}."""
    marker = root / "dataset.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from huggingface_hub import HfApi, constants

    constants.HF_HUB_DISABLE_XET = True  # the local Hub speaks the classic LFS upload only
    constants.HF_HUB_OFFLINE = False
    started = time.monotonic()
    rng = np.random.default_rng(rows)
    pool = sentence_pool(rng, vocabulary())
    shards = math.ceil(rows / SHARD_ROWS)
    with LocalHub(root, {TOKEN: "lvwerra"}) as hub, tempfile.TemporaryDirectory() as tmp:
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo(DATASET, repo_type="dataset", exist_ok=True)
        for split in SPLITS:
            for index in range(shards):
                first = index * SHARD_ROWS
                local = Path(tmp) / f"{split}-{index}.parquet"
                pq.write_table(
                    shard(rng, pool, first, min(SHARD_ROWS, rows - first)), local, row_group_size=ROW_GROUP_ROWS
                )
                name = f"data/{split}/train-{index:05d}-of-{shards:05d}.parquet"
                api.upload_file(path_or_fileobj=str(local), path_in_repo=name, repo_id=DATASET, repo_type="dataset")
                local.unlink()
        sizes = {
            f.path: f.size
            for f in api.list_repo_tree(DATASET, repo_type="dataset", recursive=True)
            if f.path.endswith(".parquet")
        }
    marker.write_text(json.dumps(sizes))
    print(f"data-scale: built {rows:,} rows per split in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return sizes


# -- the runs --


def recipe_job(out: Path, sft: bool) -> dict[str, Any]:
    """The recipe's data, steps and batch shapes on the tiny model (CPU, no quantization), logging every step."""
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": "data-scale"},
        "spec": {
            "model": {"name": str(TINY_MODEL), "dtype": "float32"},
            "data": {"preset": "stack-exchange-paired"},
            "sft": {"enabled": sft, "loggingSteps": 1, "optimizer": "adamw_torch"},
            "dpo": {"loggingSteps": 1, "optimizer": "adamw_torch", "gradientCheckpointing": False},
            "quantization": {"mode": "none"},
            "output": {"directory": str(out / "model")},
            "checkpointing": {"directory": str(out / "work")},
            "runtime": {"gpus": 0, "cpu": "2"},
        },
    }


class HubLog(logging.Handler):
    """The local Hub's request lines (it logs each at DEBUG), to count what it served."""

    SERVED = re.compile(r'"GET /datasets/[^ ]+?/resolve/[^/ ]+/(\S+) HTTP/1.1" 20[06]')

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def served_since(self, mark: int) -> list[str]:
        return [m[1] for line in self.lines[mark:] if (m := self.SERVED.search(line))]


def disk_usage(*paths: Path) -> int:
    """Bytes of the files under paths; links (the HF cache's snapshots link to its blobs) count nothing."""
    files = (f for path in paths if path.exists() for f in path.rglob("*") if not f.is_symlink() and f.is_file())
    return sum(f.stat().st_size for f in files)


def tree_rss(process: psutil.Process) -> int:
    try:
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def run_trainer(
    hub: LocalHub,
    log: HubLog,
    sizes: dict[str, int],
    workdir: Path,
    stage: TrainingStage,
    pythonpath: str | None = None,
) -> dict[str, Any]:
    """One `dpo-trainer run`, from a cold HF_HOME, until `stage` logs its first step (then killed)."""
    workdir.mkdir(parents=True)
    spec = workdir / "job.yaml"
    spec.write_text(yaml.safe_dump(recipe_job(workdir, sft=stage == "sft")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(workdir / "hf-home"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "MPLCONFIGDIR": str(workdir / "mpl"),
        }
    )
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, "-m", "dpo_trainer.cli", "run", str(spec), "--output", str(workdir / "work")]
    mark = len(log.lines)
    started = time.monotonic()
    with (workdir / "stderr.log").open("w") as stderr:
        child = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
        )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        process = psutil.Process(child.pid)
        while not stop.wait(0.2):
            peak = max(peak, tree_rss(process))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    seconds: dict[str, float] = {}
    assert child.stdout is not None
    for line in child.stdout:
        event = json.loads(line)
        now = round(time.monotonic() - started, 2)
        if event["event"] == "stage_end" and event["stage"] == DATA_STAGES[stage]:
            seconds["dataStageEnd"] = now
        if event["event"] == "log" and event["stage"] == stage and "loss" in event["metrics"]:
            seconds["firstStep"] = now
            break
        if event["event"] == "error":
            break
        if now > TIMEOUT_S:
            break
    peak = max(peak, tree_rss(psutil.Process(child.pid)))
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    stop.set()
    sampler.join()
    if "firstStep" not in seconds:
        raise RuntimeError(f"{stage} never stepped: see {workdir / 'stderr.log'}")
    served = log.served_since(mark)
    stats = RunLayout(workdir / "work").data_stats(stage)
    return {
        "secondsToDataStageEnd": seconds.get("dataStageEnd"),
        f"secondsToFirst{stage.upper()}Step": seconds["firstStep"],
        "bytesDownloaded": sum(sizes.get(path, 0) for path in served),
        "filesDownloaded": sorted(served),
        "diskWrittenBytes": disk_usage(workdir / "work", workdir / "hf-home"),
        "peakRssBytes": peak,
        "dataStats": json.loads(stats.read_text()) if stats.exists() else None,
    }


def head_trainer(into: Path) -> str:
    """git HEAD's trainer and API packages, extracted into `into`: a PYTHONPATH that runs the code before the change."""
    for folder in ("trainer_image", "operator"):
        archive = subprocess.run(["git", "archive", "HEAD", folder], cwd=REPO, capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
    return f"{into / 'trainer_image'}{os.pathsep}{into / 'operator'}"


def measure(rows: int, scratch: Path, baseline_head: bool) -> dict[str, Any]:
    root = CACHE / f"hub-{rows}"
    sizes = build_dataset(root, rows)
    log = HubLog()
    hub_logger = logging.getLogger("dpo_dev.hub")
    hub_logger.addHandler(log)
    hub_logger.setLevel(logging.DEBUG)
    try:
        with LocalHub(root, {TOKEN: "lvwerra"}) as hub:
            result: dict[str, Any] = {"rowsPerSplit": rows, "loadAverage": os.getloadavg()}
            for stage in ("sft", "dpo"):
                result[stage] = run_trainer(hub, log, sizes, scratch / f"{rows}-{stage}", stage)
                print(f"data-scale: {rows:,} rows, {stage}: {json.dumps(result[stage])}", file=sys.stderr, flush=True)
            if baseline_head:
                path = head_trainer(scratch / "head")
                result["sftAtHead"] = run_trainer(hub, log, sizes, scratch / f"{rows}-sft-head", "sft", path)
            result["loadAverageAfter"] = os.getloadavg()
    finally:
        hub_logger.removeHandler(log)
    return result


RATIO_KEYS = ("secondsToDataStageEnd", "bytesDownloaded", "diskWrittenBytes", "peakRssBytes")


def ratios(small: dict[str, Any], large: dict[str, Any]) -> dict[str, dict[str, float]]:
    """large / small for every measured number of each run."""
    out = {}
    for stage in ("sft", "dpo"):
        keys = (*RATIO_KEYS, f"secondsToFirst{stage.upper()}Step")
        out[stage] = {k: round(large[stage][k] / small[stage][k], 3) for k in keys if small[stage][k]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="rows per split")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--baseline-head", action="store_true", help="also run git HEAD's trainer (smallest size)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="data-scale-") as scratch:
        results = {"machine": {"cpus": os.cpu_count()}, "runs": []}
        for rows in sizes:
            results["runs"].append(measure(rows, Path(scratch), args.baseline_head and rows == sizes[0]))
        if len(sizes) > 1:
            results["ratioLargestToSmallest"] = ratios(results["runs"][0], results["runs"][-1])
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
