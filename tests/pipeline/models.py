"""What a user starts the pipeline from, made locally: an HF tokenizer with a chat template (byte-level BPE
learned from GSM8K text with the `tokenizers` library) and a tiny random HF model of each
family over it, saved together as one HF directory (safetensors). Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma")
VOCAB = 1000
"""Tokens of the test tokenizer: not a multiple of 128, so the example configs' padding adds rows."""
MAX_POSITIONS = 512
"""max_position_embeddings of the HF models: longer than the runs' seq_length (as 32768 vs 4096 for Qwen2-7B)."""
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenizer pattern of Qwen2's tokenizer."""
EOS_BOOST = 2.0
"""The EOS output row is scaled by this, so that some sampled answers end before the token limit."""


def build_tokenizer(out: Path, gsm8k_train: Path, problems: int = 400):
    """A byte-level BPE `PreTrainedTokenizerFast` learned from the first `problems` GSM8K questions and
    answers, with BOS/EOS/PAD and a chat template; saved into `out` and returned.

    Byte level with Qwen2's split pattern, because transformers 5 loads a directory whose config.json says
    qwen2 with its own Qwen2Tokenizer, rebuilt from the vocabulary and merges with that pattern: this
    tokenizer survives the rebuild (Llama and Gemma directories keep tokenizer.json as it is)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    with open(gsm8k_train) as f:
        for _, line in zip(range(problems), f):
            record = json.loads(line)
            texts += [record["question"], record["answer"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    assert len(fast) == VOCAB, len(fast)
    return fast


def hf_config(family: str, tokenizer):
    """A transformers config of `family`: 2 layers, hidden 64, 4 heads over 2 KV groups (TP=2 and PP=2
    split it), the tokenizer's vocabulary and special ids, MAX_POSITIONS positions."""
    import transformers

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=False)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16)
    raise ValueError(family)


def build_hf_model(family: str, out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a random `family` model and the tokenizer files into `out` (what `save_pretrained` of a
    model and its tokenizer gives). Weights are N(0, 0.25) (norms around their identity), so logits are
    O(1) and greedy choices are not near-ties that float rounding could flip."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, tokenizer))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            centre = 1.0 if name.endswith("norm.weight") and family != "gemma" else 0.0
            param.copy_(centre + torch.randn(param.shape, generator=gen) * 0.25)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= EOS_BOOST
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
