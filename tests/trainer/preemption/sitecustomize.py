"""Simulated preemption for the CLI runs of the tests: a startup hook, never shipped with the trainer.

Python imports `sitecustomize` at startup from the first sys.path entry that has one, so every process of a CLI
run whose PYTHONPATH holds this directory loads it, torchrun's workers too (they inherit the environment). With
KILL_AT_ENV=`<stage>:<step>[:<rank>]`, the process (only that rank's, when given) SIGKILLs itself right after
that optimizer step of that training stage, without any cleanup, like a lost node or one worker of several
dying, so the tests can prove that a rerun resumes.

The kill is a Trainer callback added to what dpo_trainer.callbacks.callbacks returns, once that module is
imported: importing it here would load transformers in every process, the launcher's included.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import signal
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

KILL_AT_ENV = "DPO_TRAINER_TEST_KILL_AT"
EXTENDED_MODULE = "dpo_trainer.callbacks"


def add_kill_callback(module: ModuleType, stage: str, step: int) -> None:
    """Wrap the module's `callbacks` so the Trainer of `stage` also gets one that dies right after `step`."""
    from transformers import TrainerCallback

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    shipped = module.callbacks

    def callbacks(ctx: Any, training_stage: str) -> list[Any]:
        return [*shipped(ctx, training_stage), *([KillAtStep()] if training_stage == stage else [])]

    module.callbacks = callbacks


class ExtendOnImport(importlib.abc.MetaPathFinder):
    """Finds EXTENDED_MODULE as usual, and adds the kill callback once the module has run."""

    def __init__(self, stage: str, step: int) -> None:
        self.stage = stage
        self.step = step

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != EXTENDED_MODULE:
            return None
        sys.meta_path.remove(self)  # one module, imported once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            add_kill_callback(module, self.stage, self.step)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_from_env() -> None:
    stage, _, at = os.environ.get(KILL_AT_ENV, "").partition(":")
    step, _, rank = at.partition(":")
    if stage and step.isdigit() and rank in ("", os.environ.get("RANK", "0")):
        sys.meta_path.insert(0, ExtendOnImport(stage, int(step)))


if __name__ == "sitecustomize":
    install_from_env()
