"""The committed tiny assets are exactly what the generator builds."""

from __future__ import annotations

import json

from dpo_trainer.tiny_assets import REJECTED, TOPICS, build_model, build_rows, build_tokenizer, tokenizer_corpus

from .conftest import TINY_DATA, TINY_MODEL


def test_dataset_is_the_generator_output() -> None:
    rows = build_rows()
    assert [json.loads(line) for line in TINY_DATA.read_text().splitlines()] == rows
    assert set(rows[0]) == {"qid", "question", "date", "metadata", "response_j", "response_k"}
    # The learnable difference: chosen answers always show code, rejected ones are stock dismissals.
    assert all("\n\n    " in r["response_j"] for r in rows)
    dismissals = {template.format(lang=lang) for template in REJECTED for lang, _, _ in TOPICS}
    assert all(r["response_k"] in dismissals for r in rows)


def test_tokenizer_and_model_are_the_generator_output() -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(tokenizer_corpus(build_rows()))
    committed = AutoTokenizer.from_pretrained(TINY_MODEL)
    assert committed.get_vocab() == tokenizer.get_vocab()
    assert (committed.bos_token, committed.eos_token, committed.pad_token) == ("<s>", "</s>", "<pad>")
    model = build_model(tokenizer)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert sum(p.numel() for p in model.parameters()) < 300_000
    weights = load_file(TINY_MODEL / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
