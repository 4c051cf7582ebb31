"""Fixtures for the value-analysis tests: a word-level HF tokenizer built here, held-out records."""

from __future__ import annotations

import json
import random

import pytest

WORDS = [
    "step",
    "one",
    "two",
    "three",
    "four",
    "so",
    "the",
    "answer",
    "is",
    "add",
    "then",
    "take",
    "away",
    "+",
    "-",
    "=",
    "####",
    "wrong",
    "right",
] + [str(d) for d in range(10)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.fixture(scope="session")
def word_tok_dir(tmp_path_factory):
    """An HF fast tokenizer: one token per word or symbol (whitespace dropped), ids < 40, no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("word_tok") / "word-tok"
    hf.save_pretrained(str(path))
    return str(path)


def make_records(n: int, seed: int = 0, process_scores: bool = False, m: int = 4) -> list[dict]:
    """Records of 2-4 arithmetic lines ("step one add 3 = 7\\n"), a final "#### N" line; process rewards
    at the end of every step line (1.0 while the running answer is right, then 0.0), outcome 1/0.

    With `process_scores`, also the field `dqo-megatron process-scores` writes: every line is a step
    (the "####" line last), and prefix k has c_k of `m` correct completions (>= 1 while right, else 0).
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        total, ok, text, steps, counts = rng.randint(0, 5), True, "", [], []
        for j in range(rng.randint(2, 4)):
            a = rng.randint(0, 4)
            wrong = rng.random() < 0.3
            total = (total + a) % 10
            ok = ok and not wrong
            text += f"step {WORDS[1 + j]} add {a} = {(total + wrong) % 10}\n"
            steps.append([len(text) - 1 if rng.random() < 0.5 else len(text), 1.0 if ok else 0.0])
            counts.append(rng.randint(1, m) if ok else 0)
        text += f"#### {total}"
        rows.append(
            {
                "prompt": f"take {i % 3} add {i % 4} then so",
                "response": text,
                "reward": float(ok),
                "prompt_id": f"p{i % 4}",
                "process_rewards": steps,
            }
        )
        if process_scores:
            rows[-1]["process_scores"] = {
                "step_ends": [e for e, _ in steps] + [len(text)],
                "prefix_correct": counts,
                "num_completions": m,
                "assign": "value",
            }
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture()
def records_file(tmp_path):
    """12 held-out records with process_rewards (see make_records)."""
    return write_jsonl(tmp_path / "held_out.jsonl", make_records(12))


@pytest.fixture()
def scored_records_file(tmp_path):
    """12 held-out records that also carry `process_scores` (see make_records)."""
    return write_jsonl(tmp_path / "held_out_scored.jsonl", make_records(12, seed=1, process_scores=True))
