"""Models for the rollout tests: the real stories260K Llama (HF and converted), a tiny random Llama
whose EOS is likely, and small problem files. Built once per session under a temporary directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EOS_BOOST = 10.0
"""The random model's EOS output row is scaled by this, so responses end after a few tokens."""
WORD_BOOST = 6.0
"""... and the rows of whole-word pieces by this, so top-k samples are words, which re-encode to the same ids."""

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A minimal Jinja chat template for the HF-tokenizer (chat prompt) path."""


@pytest.fixture(scope="session")
def stories_files(shared_data):
    """(stories260K.bin, tok512.model) of the shared data; skips when absent."""
    src = shared_data / "models" / "stories260K"
    if not (src / "stories260K.bin").is_file():
        pytest.skip(f"{src}/stories260K.bin not found in the shared data")
    return src / "stories260K.bin", src / "tok512.model"


@pytest.fixture(scope="session")
def stories_hf(stories_files, tmp_path_factory) -> tuple[str, str]:
    """(HF directory of the trained stories260K model (with tokenizer.model), its sentencepiece .model)."""
    from tests.conversion.llama2c import llama2c_to_hf

    binary, tok = stories_files
    out = llama2c_to_hf(binary, tmp_path_factory.mktemp("stories") / "stories260K", tok)
    return str(out), str(tok)


@pytest.fixture(scope="session")
def random_hf(stories_files, tmp_path_factory) -> tuple[str, str]:
    """(HF directory of a random 2-layer Llama over the stories vocabulary (512), tok512.model).

    Untied head: the EOS row scaled by EOS_BOOST (samples end with EOS after a few tokens) and the rows
    of the 90 whole-word pieces (``▁word``, encoding to themselves) by WORD_BOOST, so the top-16 tokens
    are mostly words and EOS and most samples survive the decode / re-encode check with their log-probs.
    """
    import sentencepiece
    import torch
    import transformers

    sp = sentencepiece.SentencePieceProcessor(model_file=str(stories_files[1]))
    words = [
        i
        for i in range(sp.vocab_size())
        if sp.id_to_piece(i).startswith("▁") and len(sp.id_to_piece(i)) > 1 and sp.encode(sp.id_to_piece(i)[1:]) == [i]
    ]

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight[words] *= WORD_BOOST
        model.lm_head.weight[2] *= EOS_BOOST
    out = tmp_path_factory.mktemp("random") / "random-llama"
    model.save_pretrained(out)
    return str(out), str(stories_files[1])


def _convert(hf_dir: str, out: str) -> str:
    from dqo_megatron.conversion.convert import hf_to_megatron

    hf_to_megatron(hf_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def stories_megatron(stories_hf, tmp_path_factory) -> str:
    """The stories260K model as a `convert hf-to-megatron` directory (converted in a forked process)."""
    from tests.helpers.distributed import run_distributed

    out = tmp_path_factory.mktemp("stories-meg") / "stories260K-megatron"
    run_distributed(_convert, 1, stories_hf[0], str(out), timeout=300)
    return str(out)


def write_problems(path: Path, questions: list[str], answers: list[str] | None = None) -> str:
    """A GSM8K-format problem file (question, answer with `#### N`, id)."""
    answers = answers or [f"#### {i}" for i in range(len(questions))]
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "question": q, "answer": a}) + "\n"
            for i, (q, a) in enumerate(zip(questions, answers))
        )
    )
    return str(path)


@pytest.fixture
def story_problems(tmp_path) -> str:
    """Three short story openings as GSM8K-format problems."""
    return write_problems(
        tmp_path / "problems.jsonl", ["Once upon a time", "Tom and Sue were friends.", "The dog ran to the park."]
    )
