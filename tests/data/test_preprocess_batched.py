"""The batched paths of preprocessing give exactly what the per-record paths give."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import numpy as np
import pytest

from dqo_megatron.data.indexed import TrajectoryWriter
from dqo_megatron.data.records import parse_record
from dqo_megatron.data.tokenize import TokenizeConfig, TokenizedSample, Tokenizer, TokenizerConfig, tokenize_records
from tests.data.conftest import random_record


def _sample(rng: np.random.Generator, i: int, vocab: int) -> TokenizedSample:
    T = int(rng.integers(2, 40))
    P = int(rng.integers(1, T))
    blp = None if i % 3 else -rng.random(T).astype(np.float32)
    return TokenizedSample(
        tokens=rng.integers(0, vocab, T),
        prompt_length=P,
        rewards=rng.random(T).astype(np.float32),
        behavior_logprobs=blp,
        prompt_id=f"p{i // 4}",
        outcome_reward=float(i % 2),
        correct=(-1, 0, 1)[i % 3],
        truncated_prompt_tokens=i % 5,
        truncated=i % 4 == 1,
        file="f",
        line=i + 1,
    )


@pytest.mark.parametrize("vocab", [300, 70000])
def test_add_many_writes_the_same_bytes_as_add(tmp_path: Path, vocab: int):
    rng = np.random.default_rng(0)
    samples = [_sample(rng, i, vocab) for i in range(50)]
    one, many = (
        TrajectoryWriter(str(tmp_path / "one" / "d"), vocab),
        TrajectoryWriter(str(tmp_path / "many" / "d"), vocab),
    )
    for i, s in enumerate(samples):
        one.add(s, i % 2)
    for lo, hi in ((0, 1), (1, 1), (1, 17), (17, 50)):
        many.add_many(samples[lo:hi], [i % 2 for i in range(lo, hi)])
    one.finalize({})
    many.finalize({})
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "many").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    from dqo_megatron.data.dataset import TrajectoryDataset

    ds = TrajectoryDataset(str(tmp_path / "many" / "d"))
    assert ds.truncated.tolist() == [s.truncated for s in samples] and ds.manifest["num_truncated"] == 13


def test_add_many_rejects_out_of_range_token_naming_the_record(tmp_path: Path):
    rng = np.random.default_rng(1)
    samples = [_sample(rng, i, 100) for i in range(5)]
    samples[3].tokens[0] = 100
    w = TrajectoryWriter(str(tmp_path / "d"), 100)
    with pytest.raises(ValueError, match=r"^f:4: token id out of range"):
        w.add_many(samples, [0] * 5)
    w.abort()


def test_batched_chat_template_equals_single_rendering(hf_tok_dir):
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    assert tok.templated
    prompts = [
        "hi",
        "ünïcødé {{ x }} <s>",
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
    ]
    assert tok.render_chat_batch(prompts) == [tok.render_prompt(p, {}) for p in prompts]


def test_tokenize_records_chunked_equals_one_by_one(hf_tok_dir):
    rng = random.Random(3)
    recs = [parse_record(random_record(rng, i), "f", i + 1) for i in range(40)]
    recs += recs[:5]  # repeated prompts (cache hits within and across chunks)
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir), max_length=64, overlong="truncate_prompt_left")
    chunked = tokenize_records(Tokenizer(cfg.tokenizer), recs, cfg)
    single = [tokenize_records(Tokenizer(cfg.tokenizer), [r], cfg)[0] for r in recs]
    for a, b in zip(chunked, single):
        assert type(a) is type(b)
        if isinstance(a, TokenizedSample):
            assert a.tokens.tolist() == b.tokens.tolist() and a.prompt_length == b.prompt_length
            assert a.rewards.tobytes() == b.rewards.tobytes()
        else:
            assert str(a) == str(b)


def test_preprocess_leaves_gc_state_as_it_found_it(tmp_path: Path, hf_tok_dir):
    from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
    from tests.data.conftest import write_jsonl

    rng = random.Random(4)
    src = write_jsonl(tmp_path / "r.jsonl", [random_record(rng, i) for i in range(10)])
    before = gc.get_freeze_count()
    preprocess(
        PreprocessConfig(
            inputs=[src],
            output_prefix=str(tmp_path / "o" / "d"),
            progress=False,
            tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir)),
        )
    )
    assert gc.get_freeze_count() == before and gc.isenabled()
