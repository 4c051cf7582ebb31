"""Which steps enter the analysis, with which score, and the value drops, against brute-force definitions.

No model here: the values are made by hand, so every number can be recomputed by a plain loop.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dqo_megatron.analysis.drops import collect_drops, drop_summary, step_drops
from dqo_megatron.analysis.rows import format_row, trend_file_names, trend_groups
from dqo_megatron.analysis.scores import SplitConfig, plan_steps, resolve_split, step_scores
from dqo_megatron.analysis.value_analysis import analyze_values, prepare_samples
from dqo_megatron.config import ConfigError
from dqo_megatron.data.records import SkipCounter, parse_record
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, TokenizerConfig

LINES = SplitConfig(splitter="lines")


def _records(rows):
    return [parse_record(json.dumps(r), "held_out.jsonl", i + 1, require_reward=False) for i, r in enumerate(rows)]


def _scores(counts, m=4):
    ends = [5 * (k + 1) for k in range(len(counts) + 1)]
    return {"step_ends": ends, "prefix_correct": counts, "num_completions": m}


def _brute_first_unsolvable(counts) -> int:
    """The step after the last prefix with a correct completion (0-based), by scanning backwards."""
    for k in range(len(counts) - 1, -1, -1):
        if counts[k] > 0:
            return k + 1
    return 0


@pytest.mark.parametrize("counts", [[], [0], [3], [0, 0, 0], [4, 2, 0], [0, 1, 0], [1, 0, 2, 0], [2, 2, 2]])
def test_failed_answer_first_unsolvable_step(counts):
    (rec,) = _records(
        [
            {
                "prompt": "so",
                "response": "x" * (5 * (len(counts) + 1)),
                "correct": False,
                "process_scores": _scores(counts),
            }
        ]
    )
    plan = plan_steps(rec, "prefix_solvable", LINES)
    k = _brute_first_unsolvable(counts)
    assert plan.first_unsolvable == k and plan.n_solvable == k and plan.outcome == 0.0
    assert plan.sampler_miss == any(c == 0 for c in counts[:k])  # an earlier prefix the sampler missed
    np.testing.assert_array_equal(step_scores(rec, "prefix_solvable", plan, []), [float(c > 0) for c in counts] + [0.0])
    np.testing.assert_allclose(step_scores(rec, "prefix_success", plan, []), [c / 4 for c in counts] + [0.0])


def _all_answers():
    rows = [
        {"prompt": "so", "response": "step one\nstep two\nthe answer is 4", "correct": True},  # split into 3 lines
        {
            "prompt": "so",
            "response": "step one\nstep two",
            "reward": 1.0,  # correct, scored: completions count
            "process_scores": {"step_ends": [9, 17], "prefix_correct": [0], "num_completions": 4},
        },
        {"prompt": "so", "response": "step one\nwrong", "correct": False},  # failed, unscored: the whole response
        {"prompt": "so", "response": "step one"},  # no outcome, no process scores: skipped
        {
            "prompt": "so",
            "response": "step one\nwrong",
            "reward": 0.0,
            "process_scores": {"step_ends": [9, 14], "prefix_correct": [2], "num_completions": 4},
        },
    ]
    return _records(rows)


def test_every_answer_enters():
    recs = _all_answers()
    plans = [plan_steps(r, "prefix_solvable", LINES) for r in recs]
    assert plans[0].ends == [9, 18, 33] and plans[0].n_solvable == 3 and plans[0].first_unsolvable is None
    assert plans[1].ends == [9, 17] and plans[1].n_solvable == 2
    assert plans[2].ends == [14] and plans[2].n_solvable == 0 and plans[2].first_unsolvable is None
    assert plans[3] is None
    assert plans[4].first_unsolvable == 1 and plans[4].n_solvable == 1
    # prefix_solvable: every prefix of a correct answer is solvable, even one the sampler missed
    assert step_scores(recs[1], "prefix_solvable", plans[1], []).tolist() == [1.0, 1.0]
    assert step_scores(recs[1], "prefix_success", plans[1], []).tolist() == [0.0, 1.0]  # its completions
    assert step_scores(recs[0], "prefix_success", plans[0], []).tolist() == [1.0, 1.0, 1.0]  # none: 1.0
    assert step_scores(recs[2], "prefix_success", plans[2], []).tolist() == [0.0]


def test_prepare_samples_counts_all_answers(word_tok_dir):
    recs = _all_answers()
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    counts = Counter()
    samples = prepare_samples(
        recs, Tokenizer(cfg.tokenizer), cfg, "prefix_solvable", SkipCounter(), False, counts, LINES
    )
    assert counts["unscored"] == 1 and counts["records"] == 4
    assert (counts["correct"], counts["failed"]) == (2, 2) and counts["steps"] == 3 + 2 + 1 + 2
    assert [s.success for s in samples] == [1.0, 1.0, 0.0, 0.0]
    assert [s.first_unsolvable for s in samples] == [None, None, None, 1]
    assert [s.n_solvable for s in samples] == [3, 2, 0, 1]


def test_split_resolution():
    scored = _records(
        [
            {
                "prompt": "so",
                "response": "a\nb",
                "reward": 0.0,
                "process_scores": {**_scores([1]), "step_ends": [2, 3], "splitter": "paragraphs"},
            }
        ]
    )
    assert resolve_split(SplitConfig(), None, scored).splitter == "paragraphs"  # as process-scores split
    assert resolve_split(SplitConfig(), "lines", scored).splitter == "lines"
    assert resolve_split(SplitConfig(), None, _records([{"prompt": "so", "response": "a"}])).splitter == "auto"
    with pytest.raises(ConfigError, match="--split-pattern"):
        resolve_split(SplitConfig(), "regex", scored)
    with pytest.raises(ConfigError, match="splitter='nope'"):
        resolve_split(SplitConfig(), "nope", scored)


@pytest.mark.parametrize("seed", range(5))
def test_drops_match_a_brute_force_loop(seed):
    rng = np.random.default_rng(seed)
    v0, after, n_solv, first = [], [], [], []
    for _ in range(12):
        K = int(rng.integers(1, 6))
        v0.append(float(rng.normal()))
        after.append(rng.normal(size=K))
        kind = rng.integers(3)  # correct / failed with a located step / failed without
        if kind == 0:
            n_solv.append(K), first.append(None)
        elif kind == 1:
            k = int(rng.integers(0, K))
            n_solv.append(k), first.append(k)
        else:
            n_solv.append(0), first.append(None)
    got_first, got_solv = collect_drops(v0, after, n_solv, first)
    want_first, want_solv = [], []
    for v, a, n, k in zip(v0, after, n_solv, first):
        for j in range(len(a)):
            before = v if j == 0 else a[j - 1]
            if j < n:
                want_solv.append(before - a[j])
            if j == k:
                want_first.append(before - a[j])
    np.testing.assert_allclose(got_first, want_first, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_solv, want_solv, rtol=0, atol=1e-12)
    s = drop_summary(got_first, got_solv)
    assert s["first_unsolvable"]["n"] == len(want_first) and s["solvable"]["n"] == len(want_solv)
    if want_first and want_solv:
        assert s["excess"] == pytest.approx(np.mean(want_first) - np.mean(want_solv))
        assert s["first_unsolvable"]["std"] == pytest.approx(np.std(want_first))


def test_known_drops():
    np.testing.assert_allclose(step_drops(0.5, np.array([0.6, 0.1, 0.1])), [-0.1, 0.5, 0.0])
    first, solv = collect_drops([0.5], [np.array([0.6, 0.1, 0.1])], [1], [1])
    assert first.tolist() == pytest.approx([0.5]) and solv.tolist() == pytest.approx([-0.1])
    empty = drop_summary(np.zeros(0), solv)
    assert empty["first_unsolvable"] == {"n": 0, "mean": None, "std": None} and "process_scores" in empty["reason"]


def _hand_samples(word_tok_dir):
    """Three answers to two prompts with hand-made values that equal the true solvability after each step."""
    rows = [
        {"prompt": "so", "prompt_id": "a", "response": "step one\nstep two\nstep three", "correct": True},
        {
            "prompt": "so",
            "prompt_id": "a",
            "response": "step one\nwrong two\nstep three",
            "correct": False,
            "process_scores": {"step_ends": [9, 19, 29], "prefix_correct": [3, 0], "num_completions": 4},
        },
        {
            "prompt": "take",
            "prompt_id": "b",
            "response": "wrong one\nstep two",
            "correct": False,
            "process_scores": {"step_ends": [10, 18], "prefix_correct": [0], "num_completions": 4},
        },
    ]
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    samples = prepare_samples(
        _records(rows), Tokenizer(cfg.tokenizer), cfg, "prefix_solvable", SkipCounter(), False, Counter(), LINES
    )
    values = []
    for s, truth in zip(samples, ([1, 1, 1], [1, 0, 0], [0, 0])):
        v = np.full(len(s.tokens), np.nan)
        v[s.prompt_length - 1] = 0.5 if s.prompt_id == "a" else 0.25  # V(s0)
        v[s.positions] = truth
        values.append(v)
    return samples, values


def test_analysis_of_hand_made_values(word_tok_dir):
    samples, values = _hand_samples(word_tok_dir)
    out = analyze_values(samples, values)
    st = out.stats
    assert st["per_step"]["n"] == 8 and st["per_step"]["pearson"] == pytest.approx(1.0)  # values = scores
    # first unsolvable: answer 2 step 2 (1 -> 0), answer 3 step 1 (0.25 -> 0)
    assert sorted(out.first_drops.tolist()) == pytest.approx([0.25, 1.0])
    # solvable: answer 1 (0.5 -> 1, 1 -> 1, 1 -> 1) and answer 2 step 1 (0.5 -> 1)
    assert sorted(out.solvable_drops.tolist()) == pytest.approx([-0.5, -0.5, 0.0, 0.0])
    assert st["drop"]["failed_without_first_unsolvable"] == 0 and st["drop"]["sampler_misses"] == 0
    init = st["initial"]  # prompt a: V(s0) 0.5, success 1/2; prompt b: 0.25, 0/1
    assert init["prompts"] == 2 and init["responses"] == 3 and init["pearson"] == pytest.approx(1.0)
    # a prompt-level value (DRO): no per-step numbers, V(x) against success only
    dro = analyze_values(samples, [v[: s.prompt_length] for s, v in zip(samples, values)], per_step=False, drops=False)
    assert dro.stats["per_step"] is None and dro.stats["drop"] is None and dro.stats["initial"]["prompts"] == 2


def test_rows_trend_and_format():
    rows = [
        {"run": "/r/x", "step": 50, "label": "x-50"},
        {"run": "/r/x", "step": 25, "label": "x-25"},
        {"run": "/s/x", "step": 25, "label": "y"},
        {"run": None, "step": None, "label": "conv"},
    ]
    groups = trend_groups(rows)
    assert list(groups) == ["/r/x"] and [r["step"] for r in groups["/r/x"]] == [25, 50]
    assert trend_file_names(["/r/x", "/s/x"]) == {"/r/x": "trend_x.png", "/s/x": "trend_x-2.png"}
    dro = {
        "label": "d",
        "algorithm": "dro",
        "value_target": "prompt",
        "per_step": None,
        "reason": "DRO trains V(x) only",
        "drop": None,
        "initial": {"pearson": 0.5, "prompts": 3},
    }
    assert format_row(dro) == (
        "d [dro]: per-step n/a (DRO trains V(x) only)  | V(x) vs prompt success: Pearson +0.5000 over 3 prompts"
    )
