"""The merged model: plain weights, reloadable, and holding both the SFT and the DPO change (shared quickstart run)."""

from __future__ import annotations

from pathlib import Path

from dpo_trainer.layout import CARD_FILE, PLOT_FILE

from .conftest import TINY_MODEL, CliRun


def test_merged_model_reloads_and_differs_from_base(quickstart_run: CliRun) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(quickstart_run.summary()["model"]["directory"])
    work_copy = quickstart_run.layout.model
    for name in ("model.safetensors", "config.json", "tokenizer.json", CARD_FILE, PLOT_FILE):
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


def test_final_model_holds_the_sft_change_too(quickstart_run: CliRun) -> None:
    """The seed's defect (TRL #926) merged the DPO adapter into the plain base, dropping SFT. Here the SFT merge
    differs from the base, and the final model is the DPO adapter merged into that SFT merge: it differs from the
    DPO adapter merged into the base by exactly the SFT change."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).state_dict()
    layout = quickstart_run.layout
    sft = AutoModelForCausalLM.from_pretrained(layout.sft_model).state_dict()
    final = AutoModelForCausalLM.from_pretrained(layout.model).state_dict()
    adapter = layout.adapter("dpo")
    dpo_on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), adapter)
    seed_style = dpo_on_base.merge_and_unload(safe_merge=True).state_dict()
    assert set(sft) == set(final) == set(seed_style) == set(base)

    sft_changed = [k for k in base if not torch.equal(base[k], sft[k])]
    assert any("q_proj" in k for k in sft_changed) and any("down_proj" in k for k in sft_changed)
    assert any(not torch.equal(final[k], seed_style[k]) for k in base)
    for name in base:
        torch.testing.assert_close(final[name] - seed_style[name], sft[name] - base[name], rtol=0, atol=1e-5)
