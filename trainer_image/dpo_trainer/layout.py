"""Where a run keeps everything under its work directory DIR: the one place that names those paths.

    DIR/state.json, summary.json, debug.log   stage bookkeeping, the run summary, tracebacks of failures
    DIR/data/         sft_{train,eval}/ (save_to_disk), stats.json
    DIR/sft/          checkpoint-*/, adapter/, log_history.json, parallelism.json
    DIR/sft_merge/    base + SFT adapter merged, with tokenizer
    DIR/dpo_data/     dpo_{train,eval}/ (save_to_disk), stats.json
    DIR/dpo/          checkpoint-*/, adapter/, log_history.json, parallelism.json
    DIR/model/        the final model + tokenizer (the dpo_merge stage's directory), card and plot copied in
    DIR/model_card/   README.md, training_curves.png, target.json
    DIR/gates/        result.json
    DIR/push/         result.json

Each stage owns one directory (stage_dir): a change of the stage's inputs wipes it, so nothing of an earlier
run's stage is resumed or pushed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dpojob_api.vocabulary import Stage, TrainingStage

SplitPart = Literal["train", "eval"]

CARD_FILE = "README.md"
"""The model card's file name: in DIR/model_card, next to the weights, and in a Hub repository."""
PLOT_FILE = "training_curves.png"

STAGE_DIRECTORIES: dict[Stage, str] = {stage: stage.value for stage in Stage} | {Stage.DPO_MERGE: "model"}
"""Each stage's directory under DIR; dpo_merge writes DIR/model, the model users get."""
DATA_STAGES: dict[TrainingStage, Stage] = {Stage.SFT: Stage.DATA, Stage.DPO: Stage.DPO_DATA}
"""The stage that prepares each training stage's rows."""


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run's work directory; computing a path creates nothing."""

    root: Path

    def stage_dir(self, stage: Stage) -> Path:
        return self.root / STAGE_DIRECTORIES[stage]

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def debug_log(self) -> Path:
        return self.root / "debug.log"

    def split(self, stage: TrainingStage, part: SplitPart) -> Path:
        """A rendered split of a training stage's data stage; its name is also its key in stats.json."""
        return self.stage_dir(DATA_STAGES[stage]) / f"{stage}_{part}"

    def data_stats(self, stage: TrainingStage) -> Path:
        return self.stage_dir(DATA_STAGES[stage]) / "stats.json"

    def adapter(self, stage: TrainingStage) -> Path:
        return self.stage_dir(stage) / "adapter"

    def log_history(self, stage: TrainingStage) -> Path:
        return self.stage_dir(stage) / "log_history.json"

    def parallelism(self, stage: TrainingStage) -> Path:
        return self.stage_dir(stage) / "parallelism.json"

    @property
    def sft_model(self) -> Path:
        """The base with the SFT adapter merged: what DPO trains on."""
        return self.stage_dir(Stage.SFT_MERGE)

    @property
    def model(self) -> Path:
        """The final model: the DPO adapter merged into the SFT model."""
        return self.stage_dir(Stage.DPO_MERGE)

    @property
    def card(self) -> Path:
        return self.stage_dir(Stage.MODEL_CARD) / CARD_FILE

    @property
    def plot(self) -> Path:
        return self.stage_dir(Stage.MODEL_CARD) / PLOT_FILE

    @property
    def target(self) -> Path:
        """What the card at output.hub's target revision records (read by the card stage, compared by the gates)."""
        return self.stage_dir(Stage.MODEL_CARD) / "target.json"

    @property
    def gates_result(self) -> Path:
        return self.stage_dir(Stage.GATES) / "result.json"

    @property
    def push_result(self) -> Path:
        return self.stage_dir(Stage.PUSH) / "result.json"
