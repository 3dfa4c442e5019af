"""The DPOJob spec: the single source of truth for the CRD schema, the operator and the trainer.

Defaults reproduce the Hugging Face post "Fine-tune Llama 2 with DPO" (QLoRA SFT, then DPO on
stack-exchange-paired). Field names are camelCase in YAML (Kubernetes convention) and snake_case in
Python. Only pydantic and the standard library are imported here, so the trainer image and the
operator can both use it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "dpo-operator.io"
API_VERSION = "v1alpha1"
KIND = "DPOJob"
PLURAL = "dpojobs"
NOT_ABOUT_THE_MODEL = ("runtime", "suspend", "checkpointing", "reporting", "hubTokenSecretRef")
"""Spec sections that do not change the trained model: pod settings, where checkpoints go, trackers, which Secret
holds the token. The one definition both sides use: editing them neither starts a new run in the operator nor
re-renders the model card in the trainer."""

NOT_ABOUT_TRAINING = (*NOT_ABOUT_THE_MODEL, "output")
"""Spec sections a change of which trains nothing again: NOT_ABOUT_THE_MODEL, and where the model goes (the card, the
gates, the push and output.directory: the trainer re-runs only those stages). Runs of a DPOJob that agree on the
rest share a work directory, so an output-only edit, or a retry, goes on from what the earlier run trained."""

DType = Literal["bfloat16", "float16", "float32"]
Tracker = Literal["none", "tensorboard", "wandb", "mlflow", "trackio"]
LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
LABEL_SMOOTHED_LOSSES = ("exo_pair", "robust")
"""Losses that need dpo.labelSmoothing > 0: TRL rejects exo_pair without it, and robust without it is sigmoid."""
Optimizer = Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit", "sgd", "adafactor"]
LRScheduler = Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"]
PositiveInt = Annotated[int, Field(ge=1)]
K8sName = Annotated[str, Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")]
LABEL_KEY = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
"""A label key: an optional DNS-subdomain prefix (at most 253 characters) and '/', then a name of at most 63."""
LabelValue = Annotated[str, Field(max_length=63, pattern=r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")]
ByteQuantity = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")]
"""A Kubernetes quantity of bytes (memory, disk): 32Gi, 500M, 1.5Ti."""


class SpecModel(BaseModel):
    """Base of every spec object: camelCase aliases, unknown fields rejected, assignment validated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_attribute_docstrings=True,
    )


class ModelSpec(SpecModel):
    """The base model to align."""

    name: str = Field(default="meta-llama/Llama-2-7b-hf", min_length=1)
    """Hugging Face Hub model id, or a path inside the trainer container (e.g. a mounted volume)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of the base model. Default: the repo's default branch."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model repo. Off by default: it runs arbitrary code."""
    dtype: DType = "bfloat16"
    """Dtype the base model is loaded in for merging and, with quantization off, for training."""


class HubDatasetSource(SpecModel):
    """A dataset on the Hugging Face Hub, loaded with datasets.load_dataset."""

    name: str = Field(min_length=1)
    """Dataset repo id, e.g. lvwerra/stack-exchange-paired."""
    config: str | None = None
    """Dataset configuration name."""
    split: str = "train"
    """Split to read."""
    data_dir: str | None = None
    """Sub-directory of the dataset repo, e.g. data/rl."""
    revision: str | None = None
    """Dataset revision (branch, tag or commit)."""


FILE_FORMATS: dict[str, Literal["jsonl", "json", "parquet"]] = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
"""The formats a file name's extension stands for (a compression suffix such as .gz is looked through)."""
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zstd")


def format_of(path: str) -> Literal["jsonl", "json", "parquet"] | None:
    """The format a file name's extension says, or None."""
    name = path.lower()
    for suffix in _COMPRESSION:
        name = name.removesuffix(suffix)
    return next((fmt for ext, fmt in FILE_FORMATS.items() if name.endswith(ext)), None)


class FilesDatasetSource(SpecModel):
    """Local data files (e.g. on a mounted volume) in one format."""

    paths: list[str] = Field(min_length=1)
    """Files or glob patterns inside the trainer container."""
    format: Literal["jsonl", "json", "parquet"] | None = None
    """File format; left out, the paths' extension says it (.jsonl, .json or .parquet, also compressed as in
    train.jsonl.gz). jsonl and json are both read by the json loader."""

    @model_validator(mode="after")
    def _one_known_format(self) -> FilesDatasetSource:
        said = {format_of(path) for path in self.paths}
        loaders = {("parquet" if fmt == "parquet" else "json") for fmt in said if fmt}
        if self.format is None and (None in said or len(loaders) > 1):
            raise ValueError(
                f"format: cannot tell the file format from the paths {self.paths} (known extensions: "
                f"{', '.join(FILE_FORMATS)}); set format to jsonl, json or parquet"
            )
        if self.format is not None and loaders - {self.builder}:
            raise ValueError(
                f"format: {self.format} does not match the paths {self.paths}, whose extension says "
                f"{' and '.join(sorted(f for f in said if f))}; set the format they hold, or leave format out"
            )
        return self

    @property
    def builder(self) -> Literal["json", "parquet"]:
        """The `datasets` builder that reads these files."""
        fmt = self.format or next(f for f in map(format_of, self.paths) if f)
        return "parquet" if fmt == "parquet" else "json"


class DatasetSource(SpecModel):
    """Where rows come from: exactly one of hub or files."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["hub"]}, {"required": ["files"]}]})

    hub: HubDatasetSource | None = None
    """A Hub dataset."""
    files: FilesDatasetSource | None = None
    """Local files."""

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetSource:
        if (self.hub is None) == (self.files is None):
            raise ValueError("set exactly one of hub or files")
        return self


def template_fields(template: str) -> list[str]:
    """Column names a str.format template refers to, e.g. "Q: {question}" -> ["question"]."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


class SFTData(SpecModel):
    """Rows for supervised fine-tuning, rendered to text with a template over dataset columns."""

    source: DatasetSource
    """Training rows."""
    text_template: str = Field(min_length=1)
    """Python format string over dataset columns producing the training text."""
    eval_size: int = Field(default=0, ge=0)
    """Hold out the first N rows for evaluation (0: no evaluation)."""


class DPOData(SpecModel):
    """Preference pairs: prompt, chosen and rejected rendered with templates over dataset columns."""

    source: DatasetSource
    """Training pairs."""
    eval_source: DatasetSource | None = None
    """Evaluation pairs (optional; evalSize caps how many are used); otherwise evalSize rows of source are held out."""
    prompt_template: str = Field(min_length=1)
    """Format string over columns producing the prompt."""
    chosen_template: str = Field(min_length=1)
    """Format string over columns producing the preferred answer."""
    rejected_template: str = Field(min_length=1)
    """Format string over columns producing the dispreferred answer."""
    eval_size: int = Field(default=0, ge=0)
    """Without evalSource: hold out the first N rows of source (0: no evaluation). With it: use its first N (0: all)."""


STACK_EXCHANGE_PAIRED: dict[str, Any] = {
    "sft": {
        "source": {"hub": {"name": "lvwerra/stack-exchange-paired", "dataDir": "data/finetune", "split": "train"}},
        "textTemplate": "Question: {question}\n\nAnswer: {response_j}",
        "evalSize": 4000,
    },
    "dpo": {
        "source": {"hub": {"name": "lvwerra/stack-exchange-paired", "dataDir": "data/rl", "split": "train"}},
        "evalSource": {
            "hub": {"name": "lvwerra/stack-exchange-paired", "dataDir": "data/evaluation", "split": "train"}
        },
        "promptTemplate": "Question: {question}\n\nAnswer: ",
        "chosenTemplate": "{response_j}",
        "rejectedTemplate": "{response_k}",
        "evalSize": 1000,  # the seed evaluated on the first 1000 rows of data/evaluation
    },
}
PRESETS: dict[str, dict[str, Any]] = {"stack-exchange-paired": STACK_EXCHANGE_PAIRED}


class DataSpec(SpecModel):
    """Training data. A preset fills whatever sft/dpo leave unset."""

    preset: Literal["stack-exchange-paired", "none"] = "stack-exchange-paired"
    """Built-in mapping; stack-exchange-paired reproduces the seed recipe exactly; none: map the columns yourself."""
    sft: SFTData | None = None
    """SFT rows (required when preset is none and SFT is enabled)."""
    dpo: DPOData | None = None
    """Preference pairs (required when preset is none)."""
    max_samples: int | None = Field(default=None, ge=1)
    """Use at most this many training rows per stage (after eval hold-out). Default: all."""

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Fill the stages from the preset: keys a stage leaves out are the preset's, except that a stage
        which names its own source does not inherit the preset's separate evaluation source, nor the evalSize
        that caps it (it would hold rows out of the stage's own source instead)."""
        if not isinstance(data, dict):
            return data
        preset = PRESETS.get(data.get("preset", "stack-exchange-paired"))
        if preset is None:
            return data
        merged = dict(data)
        for stage, defaults in preset.items():
            given = data.get(stage)
            if given is None:
                merged[stage] = defaults
            elif isinstance(given, dict):
                tied_to_source = ("evalSource", "evalSize") if "evalSource" in defaults and "source" in given else ()
                inherited = {k: v for k, v in defaults.items() if k not in tied_to_source}
                merged[stage] = {**inherited, **given}
        return merged

    @model_validator(mode="after")
    def _dpo_required(self) -> DataSpec:
        if self.dpo is None:
            raise ValueError("dpo is required when preset is none")
        return self


class LoRASpec(SpecModel):
    """Low-rank adapter settings."""

    r: int = Field(default=8, ge=1, le=1024)
    """Adapter rank."""
    alpha: int = Field(default=16, ge=1)
    """LoRA alpha (scaling = alpha / r)."""
    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the adapter input."""
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    """Module names the adapter wraps."""


class DPOLoRASpec(LoRASpec):
    """Low-rank adapter settings of the DPO stage: the seed's DPO adapter also wraps k_proj."""

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj", "k_proj"], min_length=1)
    """Module names the adapter wraps."""


Comparison = Literal["<", "<=", ">", ">="]
RuleAction = Literal["fail", "finish", "warn"]
RULE_FIELDS = ("stopRules", "builtinStopRules")
"""A training section's fields that watch training rather than decide it: left out of the training hash and of
the stage's inputs, so editing a rule goes on from the checkpoint (a new run, the same work directory)."""
SHARING_FIELDS = ("reuse",)
"""The sft section's fields that say where the SFT model may come from, not how it trains: left out like
RULE_FIELDS (a reused SFT model is the very model this DPOJob would train)."""


class StopRule(SpecModel):
    """A rule on a metric the stage logs, checked at every log of the stage (train and eval logs)."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    """Names the rule in status, Events and messages."""
    metric: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_./-]+$")
    """A metric the stage's Trainer logs, by its TRL name: loss, grad_norm, rewards/margins, rewards/accuracies,
    logps/chosen, eval_loss, eval_rewards/accuracies, ... A log without it neither counts nor breaks a streak."""
    comparison: Comparison
    """How the metric compares with the threshold for the rule to count a log."""
    threshold: float = Field(allow_inf_nan=False)
    """The value the metric is compared with."""
    after_step: int = Field(default=0, ge=0)
    """Logs before this optimizer step do not count."""
    for_logs: int = Field(default=1, ge=1, le=1000)
    """Consecutive logs (that carry the metric) the comparison must hold for."""
    action: RuleAction = "fail"
    """fail: stop now, keep a checkpoint, fail the run (reason StoppedByRule, nothing pushed); finish: stop
    training early and go on to merge and push (a plateau); warn: a condition and a Warning Event, training goes
    on."""


class TrainingSpec(SpecModel):
    """Hyperparameters shared by the SFT and DPO stages."""

    max_steps: int = Field(default=-1, ge=-1)
    """Optimizer steps; -1 trains numTrainEpochs epochs instead."""
    num_train_epochs: float = Field(default=1.0, gt=0)
    """Epochs when maxSteps is -1."""
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    """Peak learning rate."""
    lr_scheduler_type: LRScheduler = "cosine"
    """Learning-rate schedule."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps."""
    batch_size: PositiveInt = 4
    """Per-device train batch size."""
    gradient_accumulation_steps: PositiveInt = 2
    """Micro-batches per optimizer step."""
    max_length: PositiveInt = 1024
    """Maximum tokens per sequence."""
    optimizer: Optimizer = "paged_adamw_32bit"
    """Optimizer (paged optimizers need bitsandbytes)."""
    weight_decay: float = Field(default=0.05, ge=0, le=1)
    """AdamW weight decay of the adapter weights; lost to rounding on 4-bit runs (TRL keeps QLoRA adapters in bf16)."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward to save memory."""
    logging_steps: PositiveInt = 10
    """Log (and report progress) every N steps."""
    eval_steps: PositiveInt = 100
    """Evaluate every N steps when eval data exists."""
    lora: LoRASpec = Field(default_factory=LoRASpec)
    """Adapter for this stage."""
    stop_rules: list[StopRule] = Field(default_factory=list, max_length=16)
    """Rules on the stage's logged metrics: stop (failing or finishing early) or warn while it trains."""
    builtin_stop_rules: bool = True
    """The built-in rules: a non-finite loss fails the run at once (reason Diverged); in DPO, chosen and rejected
    log-probabilities both falling for 5 logs while the margin grows (likelihood displacement) warns."""

    @field_validator("stop_rules")
    @classmethod
    def _unique_rule_names(cls, rules: list[StopRule]) -> list[StopRule]:
        names = [rule.name for rule in rules]
        if len(names) != len(set(names)):
            raise ValueError(f"stop rule names must be unique: {sorted({n for n in names if names.count(n) > 1})}")
        return rules


class SFTSpec(TrainingSpec):
    """Supervised fine-tuning with QLoRA before DPO."""

    enabled: bool = True
    """Run SFT before DPO. Off: DPO starts from the base model."""
    max_steps: int = Field(default=500, ge=-1)
    """Optimizer steps; -1 trains numTrainEpochs epochs instead."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory (the seed's SFT ran without)."""
    packing: bool = True
    """Pack several rows into each maxLength sequence."""
    reuse: bool = True
    """Share the merged SFT model with other DPOJobs through runtime.checkpointVolume: a DPOJob whose SFT (base
    model at its resolved commit, SFT data and template, hyperparameters, quantization, LoRA) matches one already
    trained there skips SFT, and one started while another trains it waits for it (status.sftModel). Needs a
    checkpointVolume; false trains SFT in this DPOJob's own work directory only."""


def _dpo_rules(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """The dpo section's CEL rules, from the same defaults and loss names the validator below uses. Enforced at
    apply time on Kubernetes >= 1.25; older servers ignore them and the operator's validation reports the same
    problem as InvalidSpec."""
    defaults = {name: field.default for name, field in model.model_fields.items()}
    smoothed = " || ".join(f"t == '{loss}'" for loss in LABEL_SMOOTHED_LOSSES)
    schema["x-kubernetes-validations"] = [
        {
            "rule": "!has(self.lossWeights) || size(self.lossWeights) == "
            "(has(self.lossType) ? size(self.lossType) : 1)",
            "message": "lossWeights needs one weight per lossType entry",
        },
        {
            "rule": f"!has(self.lossType) || !self.lossType.exists(t, {smoothed}) || "
            "(has(self.labelSmoothing) && self.labelSmoothing > 0.0)",
            "message": f"lossType {' and '.join(LABEL_SMOOTHED_LOSSES)} need labelSmoothing > 0",
        },
        {
            "rule": f"(has(self.maxPromptLength) ? self.maxPromptLength : {defaults['max_prompt_length']}) < "
            f"(has(self.maxLength) ? self.maxLength : {defaults['max_length']})",
            "message": "maxPromptLength must be less than maxLength",
        },
    ]


class DPOSpec(TrainingSpec):
    """Direct Preference Optimization on the merged SFT model."""

    model_config = ConfigDict(json_schema_extra=lambda schema, model: _dpo_rules(schema, model))

    beta: float = Field(default=0.1, gt=0)
    """Strength of the KL penalty towards the reference model."""
    loss_type: list[LossType] = Field(default_factory=lambda: cast("list[LossType]", ["sigmoid"]), min_length=1)
    """DPO loss(es); several are combined with lossWeights."""
    loss_weights: list[float] | None = None
    """One weight per lossType entry."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Label smoothing: exo_pair (try 1e-3) and robust (try 0.1) need it > 0; aot and aot_unpaired use it too."""
    max_steps: int = Field(default=1000, ge=-1)
    """Optimizer steps; -1 trains numTrainEpochs epochs instead."""
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    """Peak learning rate."""
    gradient_accumulation_steps: PositiveInt = 4
    """Micro-batches per optimizer step."""
    max_prompt_length: PositiveInt = 512
    """Pairs whose prompt exceeds this many tokens (BOS included, as TRL counts) are dropped (TRL does not check)."""
    precompute_ref_log_probs: bool = False
    """Compute reference log-probs once up front (saves a forward pass per step)."""
    lora: DPOLoRASpec = Field(default_factory=DPOLoRASpec)
    """Adapter for this stage."""

    @model_validator(mode="after")
    def _consistent(self) -> DPOSpec:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"lossWeights has {len(self.loss_weights)} entries but lossType has {len(self.loss_type)}")
        needs_smoothing = [t for t in self.loss_type if t in LABEL_SMOOTHED_LOSSES]
        if needs_smoothing and self.label_smoothing == 0:
            raise ValueError(
                f"lossType {' and '.join(needs_smoothing)} needs spec.dpo.labelSmoothing > 0 "
                "(e.g. 0.001 for exo_pair, 0.1 for robust)"
            )
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"maxPromptLength ({self.max_prompt_length}) must be less than maxLength ({self.max_length})"
            )
        return self


class QuantizationSpec(SpecModel):
    """Quantization of the frozen base weights during training (QLoRA)."""

    mode: Literal["4bit", "none"] = "4bit"
    """4bit: bitsandbytes QLoRA; none: train LoRA on the unquantized model."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    compute_dtype: DType = "bfloat16"
    """Dtype of matmuls on dequantized weights."""
    double_quant: bool = False
    """Quantize the quantization constants too (saves ~0.4 bits/param)."""


class SecretKeyRef(SpecModel):
    """A key of a Secret in the DPOJob's namespace."""

    name: K8sName
    """Secret name."""
    key: str = Field(default="token", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
    """Key inside the Secret (letters, digits, '-', '_', '.')."""


class HubOutput(SpecModel):
    """Push the merged model to the Hugging Face Hub."""

    repo_id: str = Field(min_length=3, max_length=96, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    """Target model repo, namespace/name."""
    private: bool = True
    """Create the repo private (the safe default); an existing public repo stays public, with a warning."""
    revision: str | None = None
    """Branch to push to (created if missing). Default: main."""
    commit_message: str = "Upload DPO-aligned model trained by dpo-operator"
    """Commit message of the upload."""
    run_revision: Literal["tag", "branch", "none"] = "tag"
    """Pin each run: tag its commit run-gN (N: the run's generation), push to a new branch run-gN, or neither."""


class QualityGates(SpecModel):
    """Checks of the final DPO evaluation before the push: a failed gate fails the run (QualityGateFailed), no push."""

    min_eval_reward_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Lowest final eval rewards/accuracies (share of eval pairs whose chosen answer out-scores the rejected one)."""
    min_eval_reward_margin: float | None = None
    """Lowest final eval rewards/margins (mean reward of chosen minus rejected answers)."""
    max_eval_loss: float | None = Field(default=None, gt=0)
    """Highest final DPO eval loss."""
    not_worse_than_target: bool = False
    """Eval rewards/accuracies and margins >= those in the card at hub.revision (none there: passes). Needs hub."""

    @property
    def enabled(self) -> list[str]:
        """The gates set here, camelCase; every one compares final DPO eval metrics."""
        return [
            name
            for name, value in (
                ("minEvalRewardAccuracy", self.min_eval_reward_accuracy),
                ("minEvalRewardMargin", self.min_eval_reward_margin),
                ("maxEvalLoss", self.max_eval_loss),
                ("notWorseThanTarget", self.not_worse_than_target or None),
            )
            if value is not None
        ]


class OutputSpec(SpecModel):
    """Where the merged model goes: the Hub, a directory, or both."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.gates) || !has(self.gates.notWorseThanTarget) || "
                    "!self.gates.notWorseThanTarget || has(self.hub)",
                    "message": "gates.notWorseThanTarget needs hub: it compares with the model at hub.revision",
                }
            ]
        }
    )

    hub: HubOutput | None = None
    """Hub destination."""
    directory: str | None = None
    """Directory (e.g. a mounted volume) that receives the merged model."""
    gates: QualityGates | None = None
    """Quality gates the final DPO evaluation must pass before the push (also checked without hub)."""

    @model_validator(mode="after")
    def _target_for_gates(self) -> OutputSpec:
        if self.gates is not None and self.gates.not_worse_than_target and self.hub is None:
            raise ValueError("gates.notWorseThanTarget needs hub: it compares with the model at hub.revision")
        return self


class CheckpointingSpec(SpecModel):
    """Checkpoints make every stage resumable (e.g. after preemption or suspend)."""

    save_steps: PositiveInt = 100
    """Save a checkpoint every N optimizer steps."""
    save_total_limit: int | None = Field(default=2, ge=1)
    """Keep at most this many checkpoints per stage."""
    directory: str = "/checkpoints"
    """Work directory for stages and checkpoints; mount a volume here to survive pod restarts."""


class ReportingSpec(SpecModel):
    """Experiment trackers."""

    report_to: list[Tracker] = Field(default_factory=lambda: cast("list[Tracker]", ["none"]))
    """Trackers the Trainer reports to (progress always reaches DPOJob status)."""


class Toleration(SpecModel):
    """A Kubernetes pod toleration."""

    key: str | None = None
    """Taint key to match; unset with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists matches any value; Equal (the Kubernetes default) needs value to match."""
    value: str | None = None
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; unset matches every effect."""
    toleration_seconds: int | None = None
    """With effect NoExecute: seconds the pod stays on the node once tainted (unset: for ever)."""

    @model_validator(mode="after")
    def _seconds_need_no_execute(self) -> Toleration:
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only allowed with effect NoExecute")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty with operator Exists")
        return self


class LocalObjectReference(SpecModel):
    """A reference to an object by name in the same namespace."""

    name: K8sName
    """Object name."""


class VolumeClaim(SpecModel):
    """An existing PersistentVolumeClaim mounted into the trainer pod."""

    claim_name: K8sName
    """PVC name in the DPOJob's namespace."""
    read_only: bool = False
    """Mount read-only."""


class RuntimeSpec(SpecModel):
    """How the trainer pod runs on the cluster. Outside Kubernetes `dpo-trainer run` reads only gpus."""

    image: str = Field(default="ghcr.io/dpo-operator/trainer:0.1.0", min_length=1)
    """Trainer container image."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    image_pull_secrets: list[LocalObjectReference] = Field(default_factory=list)
    """Pull secrets for private registries."""
    gpus: int = Field(default=1, ge=0, le=64)
    """nvidia.com/gpu per pod, data-parallel when > 1; > 0 needs CUDA (else GPUUnavailable); 0 trains on CPU."""
    cpu: str = Field(default="4", pattern=r"^([0-9]+m?|[0-9]*\.[0-9]+)$")
    """CPU request (Kubernetes quantity)."""
    memory: ByteQuantity = "32Gi"
    """Memory request and limit (Kubernetes quantity)."""
    node_selector: dict[str, LabelValue] = Field(default_factory=dict)
    """Node labels the pod must match."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Taints the pod tolerates (GPU nodes are often tainted)."""
    affinity: dict[str, Any] | None = None
    """Kubernetes affinity, passed through unchanged."""
    priority_class_name: K8sName | None = None
    """PriorityClass of the pod (for preemption and queueing)."""
    service_account_name: K8sName | None = None
    """ServiceAccount of the trainer pod. It needs no API rights; its token is not mounted."""
    checkpoint_volume: VolumeClaim | None = None
    """PVC mounted at checkpointing.directory so a restarted pod resumes. Default: an emptyDir."""
    data_volume: VolumeClaim | None = None
    """PVC mounted at /data for file-based datasets and local models."""
    output_volume: VolumeClaim | None = None
    """PVC mounted at /output for output.directory."""
    cache_volume: VolumeClaim | None = None
    """PVC at /cache holding HF_HOME: model and datasets download once per claim. Default: the operator's, if set."""
    scratch_size: ByteQuantity | None = None
    """Size limit of the pod's /tmp emptyDir. Default: 50Gi while it holds HF_HOME (no cacheVolume), else 10Gi."""
    work_dir_size: ByteQuantity = "40Gi"
    """Size limit of the emptyDir at checkpointing.directory without a checkpointVolume: both merged models, data."""
    backoff_limit: int = Field(default=2, ge=0, le=20)
    """Pod retries before the DPOJob fails."""
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    """Wall-clock limit of one run; exceeding it fails the DPOJob."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0)
    """Delete the finished trainer Job and its pods after N seconds. The DPOJob itself is kept."""

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not LABEL_KEY.fullmatch(key) or len(key.partition("/")[0]) > 253:
                raise ValueError(f"{key!r} is not a label key (optional DNS prefix and '/', then up to 63 characters)")
        return value


class DPOJobSpec(SpecModel):
    """Desired state of a DPOJob: align a model with preference data (QLoRA SFT, then DPO)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.output) && (has(self.output.hub) || has(self.output.directory))",
                    "message": "output needs hub or directory (or both): the merged model has to go somewhere",
                }
            ]
        }
    )

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Base model."""
    data: DataSpec = Field(default_factory=DataSpec)
    """Training data."""
    sft: SFTSpec = Field(default_factory=SFTSpec)
    """Supervised fine-tuning stage."""
    dpo: DPOSpec = Field(default_factory=DPOSpec)
    """DPO stage."""
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    """Base-weight quantization during training."""
    output: OutputSpec = Field(default_factory=OutputSpec)
    """Where the merged model goes."""
    hub_token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face token (for gated base models and pushes). Exposed to the trainer as HF_TOKEN."""
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec)
    """Checkpoints and resume."""
    reporting: ReportingSpec = Field(default_factory=ReportingSpec)
    """Experiment tracking."""
    seed: int = Field(default=0, ge=0)
    """Random seed for data shuffling, adapter init and training."""
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    """Pod settings on the cluster."""
    suspend: bool = False
    """Suspend the run: the trainer pod is removed and resumes from its checkpoint when set back to false."""

    @model_validator(mode="after")
    def _consistent(self) -> DPOJobSpec:
        if self.output.hub is None and self.output.directory is None:
            raise ValueError("output needs hub or directory (or both): the merged model has to go somewhere")
        if self.sft.enabled and self.data.sft is None:
            raise ValueError("data.sft is required when sft.enabled is true and data.preset is none")
        dpo_data = self.data.dpo
        gates = self.output.gates
        if gates and gates.enabled and dpo_data and dpo_data.eval_source is None and dpo_data.eval_size == 0:
            names = ", ".join(f"output.gates.{name}" for name in gates.enabled)
            raise ValueError(f"{names}: needs DPO eval metrics, but evaluation is off (data.dpo.evalSize is 0)")
        return self


class DPOJob(BaseModel):
    """A whole DPOJob document, as applied with kubectl; the trainer reads its spec."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["dpo-operator.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["DPOJob"]
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: DPOJobSpec


def describe_validation_error(exc: ValidationError, prefix: str = "spec") -> str:
    """One line per problem, each naming the field path and what is allowed (no traceback, no input dump)."""
    lines = []
    for error in exc.errors(include_url=False):
        path = ".".join([prefix, *(str(p) for p in error["loc"])]) if prefix else ".".join(map(str, error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        elif error["type"] == "literal_error" and "expected" in error.get("ctx", {}):
            message = f"must be one of {error['ctx']['expected']}"
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def model_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec dict (camelCase, as written or dumped by alias) less NOT_ABOUT_THE_MODEL: what decides the model."""
    return {k: v for k, v in spec.items() if k not in NOT_ABOUT_THE_MODEL}


def training_hash(spec: DPOJobSpec) -> str:
    """Hash of what a run trains (the spec less NOT_ABOUT_TRAINING and the stop rules, defaults filled in): names
    its work directory."""
    dumped = spec.model_dump(by_alias=True, mode="json")
    kept = {k: v for k, v in dumped.items() if k not in NOT_ABOUT_TRAINING}
    return digest({k: without_rules(v) if k in ("sft", "dpo") else v for k, v in kept.items()})


def without_rules(section: dict[str, Any]) -> dict[str, Any]:
    """A training section (sft, dpo) less RULE_FIELDS and SHARING_FIELDS: what decides how it trains."""
    return {k: v for k, v in section.items() if k not in RULE_FIELDS and k not in SHARING_FIELDS}


def digest(value: Any) -> str:
    """A short stable hash of JSON-able data (run identities, Job contents)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(spec: dict[str, Any]) -> str:
    """Hash of what decides the trained model (spec.model_identity, shared with the trainer): a run's identity."""
    return digest(model_identity(spec))


def legacy_spec_hash(spec: dict[str, Any]) -> str:
    """The run identity recorded by 0.1.0 (the spec less suspend and runtime), so that its runs are recognised
    after an operator upgrade instead of all being trained again."""
    return digest({k: v for k, v in spec.items() if k not in ("suspend", "runtime")})
