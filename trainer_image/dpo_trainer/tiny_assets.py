"""Build the tiny model, tokenizer and preference dataset that ship with the project.

Nothing can be downloaded at run time, yet the quickstart and the tests need a real causal LM and a
dataset shaped like lvwerra/stack-exchange-paired. This generator is deterministic: the same
command always writes the same rows, vocabulary and weights, so the committed copy under
examples/assets/ can be regenerated and diffed.

    python -m dpo_trainer.tiny_assets examples/assets
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATASET_FILE = "tiny-stack-exchange.jsonl"
MODEL_DIR = "tiny-llama"
ROWS = 320
VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]

# (language, task, answer snippet). Chosen answers show the snippet; rejected ones never help.
TOPICS: list[tuple[str, str, str]] = [
    ("Python", "reverse a list", "items[::-1]"),
    ("Python", "read a file line by line", "for line in open(path): print(line)"),
    ("Python", "merge two dicts", "merged = {**a, **b}"),
    ("Python", "sort a list of tuples by the second item", "sorted(pairs, key=lambda p: p[1])"),
    ("Python", "check if a key exists in a dict", "if key in d: ..."),
    ("Python", "remove duplicates from a list", "list(dict.fromkeys(items))"),
    ("Python", "get the current time", "datetime.now()"),
    ("Python", "count words in a string", "len(text.split())"),
    ("JavaScript", "copy an array", "const copy = [...items];"),
    ("JavaScript", "parse a JSON string", "JSON.parse(text)"),
    ("JavaScript", "check if a variable is undefined", "if (x === undefined) { ... }"),
    ("JavaScript", "round a number to two decimals", "Math.round(x * 100) / 100"),
    ("bash", "loop over files in a folder", "for f in dir/*; do echo $f; done"),
    ("bash", "count lines in a file", "wc -l file.txt"),
    ("bash", "find files by name", "find . -name '*.txt'"),
    ("bash", "replace text in a file", "sed -i 's/old/new/g' file.txt"),
    ("git", "undo the last commit", "git reset --soft HEAD~1"),
    ("git", "rename a branch", "git branch -m old new"),
    ("git", "see the history of one file", "git log --follow file.txt"),
    ("git", "discard local changes", "git checkout -- file.txt"),
    ("SQL", "select the ten newest rows", "SELECT * FROM t ORDER BY created DESC LIMIT 10;"),
    ("SQL", "count rows per group", "SELECT k, COUNT(*) FROM t GROUP BY k;"),
    ("SQL", "delete duplicate rows", "DELETE FROM t WHERE id NOT IN (SELECT MIN(id) FROM t GROUP BY k);"),
    ("CSS", "center a div", "display: flex; justify-content: center; align-items: center;"),
    ("CSS", "make text bold", "font-weight: bold;"),
    ("CSS", "hide an element", "display: none;"),
    ("Java", "convert a string to an int", "int n = Integer.parseInt(s);"),
    ("Java", "iterate over a map", "for (var e : map.entrySet()) { ... }"),
    ("Go", "read a file", "data, err := os.ReadFile(path)"),
    ("Go", "start a goroutine", "go work()"),
    ("Rust", "read a line from stdin", "std::io::stdin().read_line(&mut s)"),
    ("Rust", "convert a String to a number", "let n: i32 = s.parse().unwrap();"),
]
QUESTIONS = [
    "How do I {task} in {lang}?",
    "What is the easiest way to {task} in {lang}?",
    "In {lang}, how can I {task}?",
    "I am new to {lang}. How do I {task}?",
    "Is there a short way to {task} with {lang}?",
]
CHOSEN = [
    "You can do it like this:\n\n    {code}\n\nThis is the usual way in {lang}.",
    "Use this:\n\n    {code}\n\nIt is short and works well.",
    "Here is a simple way:\n\n    {code}\n\nHope this helps!",
    "In {lang} you can write:\n\n    {code}\n\nThat is all you need.",
]
REJECTED = [
    "Why would you want to do that?",
    "Just search for it, this has been asked before.",
    "Read the manual.",
    "No idea, sorry.",
    "Closing as duplicate.",
    "It depends.",
    "Don't use {lang} for this.",
]


def build_rows(count: int = ROWS, seed: int = 0) -> list[dict]:
    """Stack-exchange-paired shaped rows: response_j (helpful, with code) beats response_k (dismissive)."""
    rng = random.Random(seed)
    rows = []
    for qid in range(count):
        lang, task, code = rng.choice(TOPICS)
        question = rng.choice(QUESTIONS).format(task=task, lang=lang)
        rows.append(
            {
                "qid": qid,
                "question": question,
                "date": f"2023/{1 + qid % 12:02d}/{1 + qid % 28:02d}",
                "metadata": [f"https://stackoverflow.com/questions/{100000 + qid}"],
                "response_j": rng.choice(CHOSEN).format(code=code, lang=lang),
                "response_k": rng.choice(REJECTED).format(lang=lang),
            }
        )
    return rows


def tokenizer_corpus(rows: list[dict]) -> list[str]:
    """The text the tokenizer learns from: prompts and both answers, as the trainer renders them."""
    return [f"Question: {r['question']}\n\nAnswer: {r['response_j']}\n{r['response_k']}" for r in rows]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on the dataset text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=512,
    )


def build_model(tokenizer):
    """A ~0.2M-parameter Llama with the seed's module names (q_proj, v_proj, ...) so LoRA targets match."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float32)


def generate(out_dir: Path) -> None:
    """Write the dataset and the model + tokenizer under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows()
    with (out_dir / DATASET_FILE).open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tokenizer = build_tokenizer(tokenizer_corpus(rows))
    model = build_model(tokenizer)
    model.save_pretrained(out_dir / MODEL_DIR)
    tokenizer.save_pretrained(out_dir / MODEL_DIR)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dpo_trainer.tiny_assets", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="directory that receives the dataset and the model")
    generate(parser.parse_args().out_dir)


if __name__ == "__main__":
    main()
