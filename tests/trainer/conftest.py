"""Fixtures for the trainer tests: the CLI run as a subprocess on the tiny assets, offline, one thread.

End-to-end runs are expensive (imports alone cost seconds), so one full quickstart run with a push to a
local Hub is shared by the tests of every module that checks its results, through the session fixture
`quickstart_run`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dpo_dev.hub import LocalHub
from dpo_trainer.errors import ALL_ERRORS
from dpo_trainer.layout import RunLayout
from dpojob_api.progress import TERMINATION_PATH_ENV

from .preemption.sitecustomize import KILL_AT_ENV

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "examples" / "assets"
TINY_MODEL = ASSETS / "tiny-llama"
TINY_DATA = ASSETS / "tiny-stack-exchange.jsonl"
QUICKSTART = REPO / "examples" / "quickstart.yaml"
HUB_TOKEN = "trainer-secret-token-4f2a9c71"  # not hf_-shaped: proves value-based scrubbing
HUB_USER = "tester"

# One thread (2-core CI boxes thrash otherwise), no network, no telemetry; Xet off for the local Hub.
CLI_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def pytest_configure() -> None:
    """The in-process parts of the suite (unit tests importing torch) use one thread too."""
    for name, value in CLI_ENV.items():
        if name != "HF_HUB_OFFLINE":  # in-process Hub clients talk to the local Hub
            os.environ.setdefault(name, value)


@dataclass
class CliRun:
    """What one `dpo-trainer run` left behind."""

    returncode: int
    stdout: str
    stderr: str
    out_dir: Path
    termination_path: Path

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.out_dir)

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def logs(self, stage: str) -> list[dict[str, Any]]:
        """Training log events of a stage, evaluation and end-of-training summaries excluded."""
        return [e for e in self.events if e["event"] == "log" and e["stage"] == stage and "loss" in e["metrics"]]

    def stage_ends(self) -> dict[str, dict[str, Any]]:
        return {e["stage"]: e for e in self.events if e["event"] == "stage_end"}

    @property
    def termination(self) -> dict[str, Any]:
        return json.loads(self.termination_path.read_text())

    def summary(self) -> dict[str, Any]:
        return json.loads(self.layout.summary.read_text())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def quickstart_job(**spec_overrides: Any) -> dict[str, Any]:
    """examples/quickstart.yaml as a dict, with spec fields overridden (camelCase, deep-merged)."""
    job = yaml.safe_load(QUICKSTART.read_text())
    job["spec"] = deep_merge(job["spec"], spec_overrides)
    return job


def run_cli(
    job: dict[str, Any] | str,
    tmp: Path,
    name: str = "run",
    *,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
    timeout: float = 300,
) -> CliRun:
    """Write the job to tmp/<name>.yaml and run the CLI from the repository root (relative asset paths)."""
    command, full_env, out_dir, termination = cli_command(job, tmp, name, env, args)
    result = subprocess.run(
        command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return CliRun(result.returncode, result.stdout, result.stderr, out_dir, termination)


def cli_command(
    job: dict[str, Any] | str, tmp: Path, name: str, env: dict[str, str] | None, args: Sequence[str] = ()
) -> tuple[list[str], dict[str, str], Path, Path]:
    """(argv, environment, output dir, termination-message path) of one CLI run; args go after `--output`."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec_path = tmp / f"{name}.yaml"
    spec_path.write_text(job if isinstance(job, str) else yaml.safe_dump(job, sort_keys=False))
    out_dir = tmp / f"{name}-out"
    termination = tmp / f"{name}-termination.json"
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_ENDPOINT", "HUGGING_FACE_HUB_TOKEN")}
    full_env.update(CLI_ENV)
    full_env.update(
        {
            TERMINATION_PATH_ENV: str(termination),
            "HF_HOME": str(tmp / "hf-home"),
            "MPLCONFIGDIR": str(tmp / "mpl"),
            **(env or {}),
        }
    )
    command = [sys.executable, "-m", "dpo_trainer.cli", "run", str(spec_path), "--output", str(out_dir), *args]
    return command, full_env, out_dir, termination


def killed_at(stage: str, step: int, rank: int | None = None) -> dict[str, str]:
    """Environment of a CLI run whose process (only that rank's, when given) is SIGKILLed right after that optimizer
    step of that stage: the startup hook in tests/trainer/preemption, inherited by torchrun's workers."""
    hooks = str(Path(__file__).with_name("preemption"))
    at = f"{stage}:{step}" if rank is None else f"{stage}:{step}:{rank}"
    return {KILL_AT_ENV: at, "PYTHONPATH": os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH")]))}


def hub_env(hub: LocalHub, token: str = HUB_TOKEN) -> dict[str, str]:
    """Environment of a CLI run that talks to the local Hub."""
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0"}


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalHub]:
    """A local Hub for the whole session; this process's huggingface_hub is pointed at nothing global."""
    from huggingface_hub import constants

    # The seed's dataset lives under lvwerra/: the tester writes there as a member of an organization of that name.
    orgs = {"lvwerra": {HUB_USER: "write"}}
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as patch, LocalHub(root, {HUB_TOKEN: HUB_USER}, orgs=orgs) as h:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield h


PUSH_REPO = f"{HUB_USER}/quickstart-dpo"
PUSH_BRANCH = "run-1"


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, hub: LocalHub) -> CliRun:
    """The quickstart (4-bit NF4 QLoRA SFT → merge → DPO → merge → card) pushed to a branch of the local Hub."""
    tmp = tmp_path_factory.mktemp("quickstart")
    job = quickstart_job(
        output={
            "directory": str(tmp / "final-model"),
            "hub": {"repoId": PUSH_REPO, "private": True, "revision": PUSH_BRANCH},
        }
    )
    run = run_cli(job, tmp, "quickstart", env=hub_env(hub))
    assert run.returncode == 0, run.stderr[-4000:]
    return run


# What DPOTrainer logs at every logging step (eval_* versions at evaluation).
DPO_KEYS = {
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
}


@pytest.fixture(scope="session")
def stack_exchange_on_hub(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The seed's dataset layout (data/finetune, data/rl, data/evaluation) as a private repo on the local Hub."""
    from huggingface_hub import HfApi

    repo_id = "lvwerra/stack-exchange-paired"
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    api.create_repo(repo_id, repo_type="dataset", private=True)
    rows = TINY_DATA.read_text().splitlines(keepends=True)
    folder = tmp_path_factory.mktemp("dataset")
    for data_dir, part in (("finetune", rows), ("rl", rows[:200]), ("evaluation", rows[200:240])):
        (folder / "data" / data_dir).mkdir(parents=True)
        (folder / "data" / data_dir / "train.jsonl").write_text("".join(part))
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)
    return repo_id


def assert_failed(run: CliRun, reason: str, *fragments: str) -> str:
    """The failure contract; returns the one stderr line for further checks."""
    code = {e.reason: e.exit_code for e in ALL_ERRORS}[reason]
    assert run.returncode == code, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dpo-trainer: {reason}: "), last
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in last
    started = [e["stage"] for e in run.events if e["event"] == "stage_start"]
    assert set(run.termination) <= {"reason", "message", "stage"} and run.termination["reason"] == reason
    if "stage" in run.termination:  # the stage the run stopped in (a launcher's own failure may not know it)
        assert started and run.termination["stage"] == started[-1]
    assert "\n" not in run.termination["message"]
    events = run.events
    assert events[-1]["event"] == "error" and events[-1]["reason"] == reason
    return last
