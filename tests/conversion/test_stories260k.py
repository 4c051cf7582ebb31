"""The real trained stories260K model (llama2.c -> HF by the test importer -> Megatron): logits match
transformers', and greedy decoding from BOS gives the same story in both frameworks."""

from __future__ import annotations

import pytest
import torch

from tests.conversion.llama2c import interleaved_to_halves, llama2c_to_hf, read_llama2c
from tests.conversion.ranks import _allow_children, convert_rank
from tests.helpers.distributed import run_distributed

STEPS = 48
BOS = 1


@pytest.fixture(scope="module")
def stories(shared_data, tmp_path_factory):
    model_dir = shared_data / "models" / "stories260K"
    if not (model_dir / "stories260K.bin").is_file():
        pytest.skip(f"{model_dir}/stories260K.bin not found in the shared data")
    root = tmp_path_factory.mktemp("stories")
    llama2c_to_hf(model_dir / "stories260K.bin", root / "hf", model_dir / "tok512.model")
    (parity,) = run_distributed(convert_rank, 1, str(root / "hf"), str(root / "meg"), verify=True)
    return model_dir, root, parity


def _greedy_megatron(meg_dir: str, steps: int):
    _allow_children()
    from pathlib import Path

    from dqo_megatron import parallel
    from dqo_megatron.config import ParallelConfig
    from dqo_megatron.conversion.megatron_io import build_empty_chunks, load_chunks, read_metadata

    cfg, _ = read_metadata(meg_dir)
    parallel.initialize(ParallelConfig())
    (chunk,) = build_empty_chunks(cfg, ParallelConfig(), torch.float32)
    load_chunks([chunk], Path(meg_dir) / "weights")
    chunk.eval()
    ids = [BOS]
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.tensor([ids])
            logits = chunk(tokens, torch.arange(len(ids)).unsqueeze(0), None)
            ids.append(int(logits[0, -1, : cfg.vocab_size].argmax()))
        full = chunk(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None)[0, :, : cfg.vocab_size]
    return ids, full


def _greedy_hf(hf_dir, steps: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = [BOS]
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        full = model(torch.tensor([ids])).logits[0]
    return ids, full


def test_rope_permutation_moves_interleaved_pairs_to_halves():
    # one head of dim 4: llama2.c rows (q0, q1, q2, q3) rotate pairs (0,1), (2,3); HF pairs (i, i+2)
    w = torch.arange(4.0).view(4, 1)
    assert interleaved_to_halves(w, 1).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_header_and_sizes(stories):
    model_dir, _root, _parity = stories
    header, tensors = read_llama2c(model_dir / "stories260K.bin")
    assert header == dict(
        dim=64, hidden_dim=172, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, seq_len=512, shared_classifier=True
    )
    assert tensors["wk"].shape == (5, 32, 64)


def test_logits_match_and_greedy_story_is_the_same(stories):
    import sentencepiece

    model_dir, root, parity = stories
    assert parity.passed and parity.max_abs_diff < 1e-4, parity.summary()
    hf_ids, hf_logits = _greedy_hf(root / "hf", STEPS)
    (meg,) = run_distributed(_greedy_megatron, 1, str(root / "meg"), STEPS)
    meg_ids, meg_logits = meg
    torch.testing.assert_close(meg_logits, hf_logits, atol=1e-4, rtol=0)
    assert meg_ids == hf_ids
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tok512.model"))
    text = sp.decode(hf_ids[1:])
    assert text.startswith("Once upon a time"), text
    assert text.startswith("Once upon a time, there was a little girl named Lily"), text
