"""`dpo-trainer run` against a bare TRL script on real model shapes: step time, tokens/s, peak memory, MFU.

    .venv/bin/python benchmarks/trainer_gpu.py --device cpu              # smoke mode (CI): tiny shape, 5 steps
    .venv/bin/python benchmarks/trainer_gpu.py --bundle out/gpu-bundle   # on a CPU box: what the GPU box lacks
    # on the GPU machine (see ../shared/notes/gpu.md), with out/gpu-bundle carried along:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site out/gpu-bundle/wheels/*.whl
    export PYTHONPATH=out/gpu-bundle/bitsandbytes:/tmp/site:operator:trainer_image
    python3 benchmarks/trainer_gpu.py --out out/gpu

Each shape is a random-weight Llama built from a config (nothing is downloaded): `1.1b` (TinyLlama's shape,
22 layers) and Llama-2-7B's width (hidden 4096, MLP 11008, 32 heads, vocabulary 32,000) at 2 and 4 layers,
whose difference gives the cost of one 7B layer: a 32-layer step ≈ step(2) + 30 x (step(4) - step(2)) / 2.
The tokenizer is word-level (one token per whitespace-separated word), so every row's token count is exact,
and the synthetic pairs have fixed lengths (prompt 384 words, answers 512) inside the seed's limits.

Both sides run the seed's settings (QLoRA NF4 with bf16 compute; SFT batch 4 x 2, packed to 1024 tokens, no
activation checkpointing; DPO batch 4 x 4, maxLength 1024, maxPromptLength 512, activation checkpointing,
beta 0.1; LoRA r 8 / alpha 16 on q,v (+k for DPO); paged_adamw_32bit) from one DPOJob spec, with a log every
step: ours as `python -m dpo_trainer.cli run`, the baseline as benchmarks/bare_trl.py's script, both the full
SFT → merge → DPO → merge. Per stage and side:

    step_s        median seconds per optimizer step (time between consecutive step logs, first 2 steps left out)
    tokens_per_s  tokens processed per second over the same steps (TRL's cumulative `num_tokens`: every
                  non-padding token of the batch; in DPO the prompt counts twice, chosen and rejected)
    peak_*_gib    torch.cuda.max_memory_allocated / _reserved during the stage (CUDA only)
    mfu           tokens_per_s x FLOPs per token / peak FLOP/s (--peak-tflops; CUDA only)

FLOPs convention: N = parameters of the matmuls a token goes through (every weight except the input
embedding; the LM head counts); a forward is 2N per token, the backward of a frozen (4-bit) base 2N (input
gradients only; LoRA's own are negligible), activation checkpointing recomputes the forward (2N), and DPO's
reference pass (the adapter disabled) is one more forward. SFT without checkpointing: 4N; DPO with it: 8N
(6N with precomputed reference log-probs). Attention's sequence-quadratic FLOPs are left out (≈ 6 % at 1,024
tokens for 7B), so the MFU is a slight underestimate.

Sanity checks (the exit code is 1 when one fails): the first DPO loss is ln 2 ≈ 0.693 on both sides (a fresh
adapter leaves policy = reference), both sides end every stage, and bitsandbytes loaded its CUDA library on a
GPU (its CPU library in CPU mode). Results go to OUT/trainer_gpu.json after every shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bare_trl
import yaml

from dpojob_api.spec import DPOJobSpec

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
GPU_SHAPES: dict[str, dict[str, int]] = {
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "7b-2l": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "7b-4l": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 4,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
}
CPU_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
    }
}
# (prompt words, answer words, SFT/DPO maxLength, DPO maxPromptLength, steps per stage) per device
LENGTHS = {"cuda": (384, 512, 1024, 512, 10), "cpu": (40, 30, 128, 64, 5)}
BUNDLE = ("trl", "datasets", "transformers", "peft", "accelerate", "huggingface-hub", "tokenizers", "safetensors")
BUNDLE += ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "dill", "multiprocess", "xxhash")
"""Wheels the GPU machine lacks or has older (at this environment's versions); bitsandbytes goes apart."""


def build_tokenizer(vocab_size: int, out: Path) -> None:
    """Word-level: one token per whitespace-separated word w<i>, BOS prepended like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab |= {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    tokenizer.save_pretrained(out)


def build_model(shape: dict[str, int], out: Path, cuda: bool) -> int:
    """A random-weight Llama of `shape`, saved in its training dtype; returns N (see the FLOPs convention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device("cuda" if cuda else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    matmul_params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return matmul_params


def write_rows(path: Path, count: int, vocab_size: int, prompt_words: int, answer_words: int) -> None:
    """Stack-exchange-paired columns with random words of fixed lengths."""
    import random

    rng = random.Random(0)
    first = len(SPECIAL_TOKENS)

    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(first, vocab_size)}" for _ in range(n))

    with path.open("w") as f:
        for qid in range(count):
            row = {
                "qid": qid,
                "question": words(prompt_words),
                "response_j": words(answer_words),
                "response_k": words(answer_words),
            }
            f.write(json.dumps(row) + "\n")


def spec_document(work: Path, data: Path, device: str) -> dict[str, Any]:
    """The DPOJob both sides run: the seed's settings at this device's lengths and step count."""
    cuda = device == "cuda"
    _, _, max_length, max_prompt, steps = LENGTHS[device]
    source = {"files": {"paths": [str(data)]}}
    stage = {"maxSteps": steps, "batchSize": 4, "maxLength": max_length, "loggingSteps": 1, "warmupSteps": 1}
    return {
        "apiVersion": "dpo-operator.io/v1alpha1",
        "kind": "DPOJob",
        "metadata": {"name": "trainer-gpu-benchmark"},
        "spec": {
            "model": {"name": str(work / "model"), "dtype": "bfloat16" if cuda else "float32"},
            "data": {
                "preset": "none",
                "sft": {"source": source, "textTemplate": "{question} {response_j}"},
                "dpo": {
                    "source": source,
                    "promptTemplate": "{question}",
                    "chosenTemplate": "{response_j}",
                    "rejectedTemplate": "{response_k}",
                },
            },
            "sft": {**stage, "gradientAccumulationSteps": 2},
            "dpo": {**stage, "gradientAccumulationSteps": 4, "maxPromptLength": max_prompt},
            "quantization": {"mode": "4bit", "computeDtype": "bfloat16" if cuda else "float32"},
            "output": {"directory": str(work / "ours" / "model")},
            "checkpointing": {"saveSteps": 100000, "directory": str(work / "ours" / "work")},
            "runtime": {"gpus": 1 if cuda else 0},
        },
    }


def rows_needed(device: str) -> int:
    """Rows for both stages: packed SFT sequences of maxLength, 16 DPO pairs per step, and a margin."""
    prompt, answer, max_length, _, steps = LENGTHS[device]
    sft = math.ceil(steps * 4 * 2 * max_length / (prompt + answer + 2))
    return max(sft, steps * 16) * 2 + 16


def env(device: str) -> dict[str, str]:
    """Offline, no token; one thread per process on CPU (as the tests run)."""
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if device == "cpu" else {}
    path = os.pathsep.join(
        filter(None, [str(REPO / "operator"), str(REPO / "trainer_image"), os.environ.get("PYTHONPATH")])
    )
    return {
        **{k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
        **threads,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run(command: list[str], cwd: Path, device: str, timeout: float = 1800.0) -> float:
    """Run a side to completion (stdout/stderr to cwd); its wall seconds. A failure shows the stderr tail."""
    cwd.mkdir(parents=True, exist_ok=True)
    extra = {"DPO_TERMINATION_MESSAGE_PATH": str(cwd / "termination-log")}
    with (cwd / "stdout.log").open("w") as out, (cwd / "stderr.log").open("w") as err:
        started = time.monotonic()
        done = subprocess.run(command, cwd=cwd, env=env(device) | extra, stdout=out, stderr=err, timeout=timeout)
    if done.returncode != 0:
        tail = (cwd / "stderr.log").read_text()[-3000:]
        raise RuntimeError(f"{command[:3]} exited {done.returncode}:\n{tail}")
    return time.monotonic() - started


def ours_timelines(stdout: Path) -> dict[str, list[dict[str, Any]]]:
    """Our progress `log` events per stage, as (time, step, metrics...) entries."""
    timelines: dict[str, list[dict[str, Any]]] = {"sft": [], "dpo": []}
    for line in stdout.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "log" and event.get("stage") in timelines:
            timelines[event["stage"]].append({"time": event["time"], "step": event["step"], **event["metrics"]})
    return timelines


def stage_figures(timeline: list[dict[str, Any]], flops_per_token: float, peak_flops: float | None) -> dict[str, Any]:
    """Median step time and tokens/s over the steps after the warm-up, from a log-every-step timeline."""
    steps = [e for e in timeline if "loss" in e and "num_tokens" in e]
    measured = [e for e in steps if e["step"] > WARMUP_STEPS]
    if len(measured) < 2:
        return {"steps_logged": len(steps)}
    first, last = measured[0], measured[-1]
    tokens_per_s = (last["num_tokens"] - first["num_tokens"]) / (last["time"] - first["time"])
    return {
        "steps_logged": len(steps),
        "first_loss": steps[0]["loss"],
        "step_s": statistics.median(b["time"] - a["time"] for a, b in itertools.pairwise(measured)),
        "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * flops_per_token / peak_flops if peak_flops else None,
    }


def flops_per_token(spec: DPOJobSpec, stage: str, n: int) -> float:
    """The FLOPs convention of the module docstring."""
    checkpointing = getattr(spec, stage).gradient_checkpointing
    per_token = 4 * n + (2 * n if checkpointing else 0)
    if stage == "dpo" and not spec.dpo.precompute_ref_log_probs:
        per_token += 2 * n
    return float(per_token)


def ours_peaks(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Our GPU memory per stage (every stage, merges too), from summary.json's stage records (CUDA only)."""
    return {
        stage: {k.removeprefix("peak_").removesuffix("_gib"): v for k, v in record["gpu"].items()}
        for stage, record in summary.get("stages", {}).items()
        if record.get("gpu")
    }


def bench_shape(name: str, shape: dict[str, int], root: Path, device: str, peak_flops: float | None) -> dict[str, Any]:
    cuda = device == "cuda"
    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    prompt, answer, *_ = LENGTHS[device]
    n = build_model(shape, work / "model", cuda)
    build_tokenizer(shape["vocab_size"], work / "model")
    write_rows(work / "rows.jsonl", rows_needed(device), shape["vocab_size"], prompt, answer)
    document = spec_document(work, work / "rows.jsonl", device)
    spec = DPOJobSpec.model_validate(document["spec"])
    (work / "dpojob.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    (work / "bare.json").write_text(json.dumps(bare_trl.config(spec, str(work / "bare" / "out"), cuda=cuda)))
    (work / "bare_trl.py").write_text(bare_trl.SCRIPT)
    walls = {
        "ours": run([sys.executable, "-m", "dpo_trainer.cli", "run", str(work / "dpojob.yaml")], work / "ours", device),
        "bare": run([sys.executable, str(work / "bare_trl.py"), str(work / "bare.json")], work / "bare", device),
    }
    bare = json.loads((work / "bare" / "out" / "bare_result.json").read_text())
    summary = json.loads((work / "ours" / "work" / "summary.json").read_text())
    timelines = {"ours": ours_timelines(work / "ours" / "stdout.log"), "bare": bare["timeline"]}
    peaks = {"ours": ours_peaks(summary), "bare": bare["peak_memory_gib"]}
    sides: dict[str, dict[str, Any]] = {}
    for side in ("ours", "bare"):
        sides[side] = {"wall_s": walls[side], "gpu_memory_gib": peaks[side]}
        for stage in ("sft", "dpo"):
            figures = stage_figures(timelines[side][stage], flops_per_token(spec, stage, n), peak_flops)
            sides[side][stage] = {**figures, "peak_gib": peaks[side].get(stage) or None}
    ratios = {"wall": walls["ours"] / walls["bare"]}
    for stage in ("sft", "dpo"):
        ours_step, bare_step = sides["ours"][stage].get("step_s"), sides["bare"][stage].get("step_s")
        ratios[f"{stage}_step"] = ours_step / bare_step if ours_step and bare_step else None
    library = bare["bnb_library"]
    sanity = {
        "dpo_first_loss_is_ln2": all(
            abs(sides[side]["dpo"].get("first_loss", math.inf) - math.log(2)) < 0.02 for side in sides
        ),
        "every_stage_measured": all(sides[side][stage].get("step_s") for side in sides for stage in ("sft", "dpo")),
        "bitsandbytes_library": library,
        "bitsandbytes_library_matches_device": ("cuda" in library) == cuda,
    }
    return {"matmul_params": n, "shape": shape, "sides": sides, "ratios_ours_over_bare": ratios, "sanity": sanity}


def per_7b_layer(results: dict[str, Any]) -> dict[str, Any] | None:
    """Step time of one 7B-width layer and a 32-layer extrapolation, per stage and side."""
    if not {"7b-2l", "7b-4l"} <= results.keys():
        return None
    out: dict[str, Any] = {}
    for side in ("ours", "bare"):
        for stage in ("sft", "dpo"):
            two, four = (results[k]["sides"][side][stage].get("step_s") for k in ("7b-2l", "7b-4l"))
            if two and four:
                layer = (four - two) / 2
                out[f"{side}_{stage}"] = {"per_layer_s": layer, "step_s_32_layers": two + 30 * layer}
    return out


def bundle(target: Path) -> int:
    """Write, for Python 3.12 / manylinux x86_64, what the GPU machine lacks or has older: wheels of this
    environment's versions in TARGET/wheels (installed there with pip --no-index --target), and bitsandbytes
    installed in TARGET/bitsandbytes with only its CUDA 13.0 library (its wheel carries every CUDA's: 43 MB)."""
    from importlib.metadata import version

    pip = [sys.executable, "-m", "pip", "--quiet"]
    where = ["--no-deps", "--only-binary=:all:", "--python-version", "3.12"]
    where += [f"--platform=manylinux_{glibc}_x86_64" for glibc in ("2_28", "2_24", "2_17")]
    wheels = [f"{name}=={version(name)}" for name in BUNDLE]
    subprocess.run([*pip, "download", *where, "--dest", str(target / "wheels"), *wheels], check=True)
    bnb = f"bitsandbytes=={version('bitsandbytes')}"
    subprocess.run([*pip, "install", *where, "--target", str(target / "bitsandbytes"), bnb], check=True)
    for library in (target / "bitsandbytes" / "bitsandbytes").glob("libbitsandbytes_*"):
        if "cuda130" not in library.name:
            library.unlink()
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"{target}: {size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", help="comma-separated (default: every shape of the device)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "trainer_gpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--bundle", type=Path, metavar="DIR", help="only write the package bundle for the GPU box")
    args = parser.parse_args()
    if args.bundle:
        return bundle(args.bundle)
    shapes = GPU_SHAPES if args.device == "cuda" else CPU_SHAPES
    chosen = args.shapes.split(",") if args.shapes else list(shapes)
    peak_flops = args.peak_tflops * 1e12 if args.device == "cuda" else None
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "peak_tflops": args.peak_tflops, "shapes": {}}
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    started = time.monotonic()
    for name in chosen:
        report["shapes"][name] = bench_shape(name, shapes[name], args.out, args.device, peak_flops)
        report["per_7b_layer"] = per_7b_layer(report["shapes"])
        report["seconds"] = time.monotonic() - started
        (args.out / "trainer_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    sane = all(all(v for k, v in r["sanity"].items() if k != "bitsandbytes_library") for r in report["shapes"].values())
    return 0 if sane else 1


if __name__ == "__main__":
    sys.exit(main())
