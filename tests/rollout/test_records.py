"""What becomes of a sample that cannot carry aligned log-probs, with a stub backend whose completions are fixed."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dqo_megatron.data.records import parse_record
from dqo_megatron.rollout.backend import Completion, GenerationBackend
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.framing import load_tokenizer
from dqo_megatron.rollout.records import logprob_check
from dqo_megatron.rollout.rollout import run_rollout
from tests.rollout.conftest import write_problems


@pytest.fixture(scope="module")
def sp_tok(stories_files):
    return load_tokenizer(stories_files[1])


def _completion(tok, text: str, *, eos: int | None = 2, ids=None, reason="eos") -> Completion:
    ids = list(tok.sp.encode(text)) if ids is None else ids
    ids = ids + ([eos] if eos is not None else [])
    lp = [-0.5] * len(ids)
    return Completion(text=text, token_ids=ids, logprobs=lp, sampled_logprobs=[-0.25] * len(ids), finish_reason=reason)


class StubBackend:
    """Hands out fixed completions per prompt (cycled), like a sampler would; no model."""

    name = "stub"
    templated = False

    def __init__(self, tok, completions, with_tokenizer=True):
        self.tokenizer = tok if with_tokenizer else None
        self.tokenizer_name = "tok512.model"
        self.completions = completions
        self.calls = []

    def generate(self, prompts, params, *, seeds, prefixes=None):
        self.calls.append(list(seeds))
        return [
            [self.completions[(k + j) % len(self.completions)] for j in range(params.n)] for k in range(len(prompts))
        ]

    def close(self):
        pass


def _spelled(tok, word: str) -> list[int]:
    """`word` as one piece per character ("▁L", "i", "l", "y"): decodes to `word`, but encoding `word`
    gives its own piece (a model may sample either; only the latter lines up with preprocessing)."""
    return [tok.sp.piece_to_id("▁" + word[0])] + [tok.sp.piece_to_id(ch) for ch in word[1:]]


def test_logprob_check_reasons(sp_tok):
    good = _completion(sp_tok, "Once upon a time")
    assert sp_tok.decode(_spelled(sp_tok, "Lily")) == "Lily" and sp_tok.sp.encode("Lily") != _spelled(sp_tok, "Lily")
    split = _completion(sp_tok, "Lily", ids=_spelled(sp_tok, "Lily"))
    assert logprob_check(sp_tok, [good])[0] is None
    assert logprob_check(sp_tok, [split]) == ["retokenize_mismatch"]
    # cut at the length limit: aligned (all generated ids, no EOS), unless it does not re-encode to them
    assert logprob_check(sp_tok, [_completion(sp_tok, "Once", eos=None, reason="length")]) == [None]
    assert logprob_check(
        sp_tok, [_completion(sp_tok, "Lily", eos=None, ids=_spelled(sp_tok, "Lily"), reason="length")]
    ) == ["retokenize_mismatch"]
    assert logprob_check(sp_tok, [_completion(sp_tok, "Once.", eos=None, reason="stop")]) == ["no_eos"]
    assert logprob_check(sp_tok, [_completion(sp_tok, "Once", eos=1)]) == ["eos_differs"]  # another stop token
    assert logprob_check(None, [good]) == ["unchecked"]


def test_records_of_every_kind_of_sample(sp_tok, tmp_path):
    completions = [
        _completion(sp_tok, "Once upon a time"),  # aligned
        _completion(sp_tok, "", eos=2),  # EOS first: empty -> dropped
        _completion(sp_tok, "Lily", eos=None, reason="length"),  # cut by the length limit
        _completion(sp_tok, "Lily", ids=_spelled(sp_tok, "Lily")),  # re-encodes to other ids
    ]
    assert isinstance(StubBackend(sp_tok, completions), GenerationBackend)
    problems = write_problems(tmp_path / "p.jsonl", ["What is 1+1?", "What is 2+2?"], ["#### 2", "#### 4"])
    cfg = RolloutConfig(problems=problems, output=str(tmp_path / "o.jsonl"), n=4, label=True, progress=False)
    summary = run_rollout(cfg, StubBackend(sp_tok, completions))
    recs = [json.loads(line) for line in open(cfg.output)]
    assert summary.samples == 8 and summary.written == 6 and summary.dropped == Counter(empty_response=2)
    assert summary.finish_reasons == Counter(eos=6, length=2)
    for line, rec in enumerate(recs, 1):
        parsed = parse_record(json.dumps(rec), line=line)
        meta = rec["metadata"]
        assert meta["group_size"] == 3 and meta["backend"] == "stub"
        # the length-cut sample, and only it, is marked truncated (the field is absent otherwise)
        assert rec.get("truncated", False) == parsed.truncated == (meta["finish_reason"] == "length")
        if "behavior_logprobs" in rec:  # the default kind: the raw log-probs (-0.5), the sampled ones in metadata
            assert rec["behavior_logprobs"] == [-0.5] * meta["num_tokens"]
            assert meta["sampled_logprobs"] == [-0.25] * meta["num_tokens"] and "raw_logprobs" not in meta
            assert "logprobs_omitted" not in meta
        else:
            assert meta["logprobs_omitted"] == "retokenize_mismatch"
            assert meta["sampled_logprobs"] and meta["raw_logprobs"]
    truncated = [r for r in recs if r.get("truncated")]
    assert len(truncated) == 2 and summary.truncated == 2
    for rec in truncated:  # one log-prob per generated token ("Lily" is one piece), no EOS
        assert (
            rec["behavior_logprobs"] == [-0.5] * len(sp_tok.sp.encode("Lily")) == [-0.5] * rec["metadata"]["num_tokens"]
        )
    assert summary.logprobs_omitted == Counter(retokenize_mismatch=2)
    assert sum(summary.logprobs_omitted.values()) == sum("behavior_logprobs" not in r for r in recs)
    # sample j of problem k is completion (k + j) % 4: the empty one is sample 1 of p0 and sample 0 of p1
    assert [r["metadata"]["sample_index"] for r in recs] == [0, 2, 3, 1, 2, 3]


def test_a_problem_whose_samples_are_all_dropped_is_sampled_again_on_resume(sp_tok, tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", ["a?", "b?"])
    empty = _completion(sp_tok, "", eos=2)
    cfg = RolloutConfig(problems=problems, output=str(tmp_path / "o.jsonl"), n=2, progress=False)
    stub = StubBackend(sp_tok, [empty])
    assert run_rollout(cfg, stub).written == 0
    again = run_rollout(cfg, stub)
    assert again.resumed_problems == 0 and stub.calls[0] == stub.calls[1]  # same seeds: the same samples again


def test_without_a_tokenizer_logprobs_are_not_trusted(sp_tok, tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", ["a?"])
    cfg = RolloutConfig(problems=problems, output=str(tmp_path / "o.jsonl"), n=1, progress=False)
    summary = run_rollout(cfg, StubBackend(sp_tok, [_completion(sp_tok, "Once")], with_tokenizer=False))
    assert summary.logprobs_omitted == Counter(unchecked=1)


@pytest.mark.parametrize("kind", ["raw", "sampled", "none"])
def test_only_length_cut_samples_are_truncated_whatever_the_kind(sp_tok, tmp_path, kind):
    completions = [
        _completion(sp_tok, "Once upon", eos=None, reason="length"),  # cut: truncated, log-probs without EOS
        _completion(sp_tok, "Once.", eos=None, reason="stop"),  # a stop string: as before, no log-probs
        _completion(sp_tok, "Once", eos=1),  # another stop token: as before
    ]
    problems = write_problems(tmp_path / "p.jsonl", ["a?"])
    cfg = RolloutConfig(
        problems=problems, output=str(tmp_path / "o.jsonl"), n=3, behavior_logprobs=kind, progress=False
    )
    summary = run_rollout(cfg, StubBackend(sp_tok, completions))
    cut, stopped, other = [json.loads(line) for line in open(cfg.output)]
    assert cut["truncated"] is True and "truncated" not in stopped and "truncated" not in other
    assert summary.truncated == 1 and "truncated at max_new_tokens" in summary.report()
    n_cut = len(sp_tok.sp.encode("Once upon"))
    value = {"raw": -0.5, "sampled": -0.25}.get(kind)
    if kind == "none":
        assert not any("behavior_logprobs" in r for r in (cut, stopped, other)) and not summary.logprobs_omitted
    else:
        assert cut["behavior_logprobs"] == [value] * n_cut == [value] * cut["metadata"]["num_tokens"]
        assert "behavior_logprobs" not in stopped and stopped["metadata"]["logprobs_omitted"] == "no_eos"
        assert "behavior_logprobs" not in other and other["metadata"]["logprobs_omitted"] == "eos_differs"
    assert parse_record(json.dumps(cut), require_reward=False).truncated
    assert not parse_record(json.dumps(stopped), require_reward=False).truncated


def test_a_kind_the_backend_did_not_compute_is_omitted_not_misaligned(sp_tok, tmp_path):
    c = _completion(sp_tok, "Once upon a time")
    c.logprobs = []  # e.g. vLLM built with raw_logprobs=False
    problems = write_problems(tmp_path / "p.jsonl", ["a?"])
    cfg = RolloutConfig(problems=problems, output=str(tmp_path / "o.jsonl"), n=1, progress=False)
    summary = run_rollout(cfg, StubBackend(sp_tok, [c]))
    (rec,) = [json.loads(line) for line in open(cfg.output)]
    assert "behavior_logprobs" not in rec and rec["metadata"]["logprobs_omitted"] == "unavailable"
    assert summary.logprobs_omitted == Counter(unavailable=1)
