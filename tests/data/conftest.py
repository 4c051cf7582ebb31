"""Fixtures for the data tests: the tiny sentencepiece model, a tiny HF tokenizer built here, records."""

from __future__ import annotations

import json
import random

import pytest

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Étape 1 : calculer 3 × 4 = 12. 日本語のテキスト。 Ωμέγα ✓ 😀",
] * 20
WORDS = ["step", "the", "answer", " is", "\n", "  ", "42", "1,000", "é", "日本", "😀", "####", "\\boxed{7}", "x²", "."]


@pytest.fixture(scope="session")
def sp_model(shared_data):
    """Path of the 512-piece sentencepiece model of the shared data."""
    return str(shared_data / "models" / "stories260K" / "tok512.model")


@pytest.fixture(scope="session")
def hf_tok_dir(tmp_path_factory):
    """A byte-level BPE HF tokenizer with a chat template, trained here on a few lines (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    path = tmp_path_factory.mktemp("hf_tok") / "tiny-bpe"
    hf.save_pretrained(str(path))
    return str(path)


def random_text(rng: random.Random, n_min: int = 1, n_max: int = 12) -> str:
    """Text of random words incl. multi-byte characters, emoji and whitespace runs."""
    return "".join(rng.choice(WORDS) + rng.choice(["", " ", ""]) for _ in range(rng.randint(n_min, n_max)))


def random_record(rng: random.Random, i: int, with_process: bool = True) -> dict:
    """A valid record; process rewards in either form; no behavior log-probs (their length depends on
    the tokenizer, tests add them after tokenizing)."""
    response = random_text(rng)
    rec = {
        "prompt": random_text(rng)
        if rng.random() < 0.7
        else [{"role": "system", "content": "Be brief."}, {"role": "user", "content": random_text(rng)}],
        "response": response,
        "prompt_id": f"p{i % 5}",
        "id": i,
    }
    if rng.random() < 0.5:
        rec["reward"] = rng.choice([0.0, 1.0, -0.5, 0.25])
    else:
        rec["correct"] = rng.random() < 0.5
    if with_process and len(response) > 1 and rng.random() < 0.6:
        cuts = sorted(rng.sample(range(1, len(response) + 1), k=min(3, len(response))))
        if rng.random() < 0.5:
            rec["process_rewards"] = [[c, rng.choice([0.5, -0.25, 1.0])] for c in cuts]
        else:
            bounds = [0] + cuts
            if bounds[-1] != len(response):
                bounds.append(len(response))
            rec["process_segments"] = [
                {"text": response[a:b], "reward": rng.choice([0.5, 0.0, 1.0])} for a, b in zip(bounds, bounds[1:])
            ]
    return rec


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)
