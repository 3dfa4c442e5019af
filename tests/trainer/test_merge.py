"""The merged model: plain weights, reloadable, different from the base (shared quickstart run)."""

from __future__ import annotations

from pathlib import Path

from .conftest import TINY_MODEL, CliRun


def test_merged_model_reloads_and_differs_from_base(quickstart_run: CliRun) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(quickstart_run.summary()["model"]["directory"])
    work_copy = quickstart_run.out_dir / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "training_curves.png"):
        assert (final / name).read_bytes() == (work_copy / name).read_bytes(), name
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).state_dict()
    merged_model = AutoModelForCausalLM.from_pretrained(final)
    merged = merged_model.state_dict()
    assert set(merged) == set(base)  # adapters were merged away: plain Llama weights only
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed)
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer("Question: How do I reverse a list in Python?\n\nAnswer: ", return_tensors="pt")
    assert merged_model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] > inputs["input_ids"].shape[1]
