"""Scoring fixed outputs: hand-computed accuracy overall, per MATH subject and per level, verdict counts."""

from __future__ import annotations

import pytest

from dqo_megatron.eval.scoring import grade_outputs, score_outputs, summarize
from dqo_megatron.tasks.datasets import Problem


def gsm(i, ref):
    return Problem(f"g{i}", "gsm8k", f"q{i}", ref, f"q{i}\n...")


def math(i, ref, subject, level):
    return Problem(f"m{i}", "math", f"p{i}", ref, f"p{i}\n...", {"subject": subject, "level": level})


def test_gsm8k_hand_computed():
    problems = [gsm(0, "Work.\n#### 10"), gsm(1, "#### 1,000"), gsm(2, "#### 5"), gsm(3, "7")]
    outputs = [
        "4 + 6 = 10\n#### 10",  # correct
        "#### 1000",  # correct (commas)
        "The answer is 5",  # no '####': no_answer
        "#### 7.0",
    ]  # correct (7.0 == 7)
    s = score_outputs(problems, outputs)
    assert (s.overall.n, s.overall.correct, s.accuracy) == (4, 3, 0.75)
    assert s.reasons == {"correct": 3, "no_answer": 1}
    assert s.by_subject == {} and s.by_level == {}


def test_math_hand_computed_with_subject_and_level_breakdown():
    problems = [
        math(0, "So $\\boxed{\\frac{1}{2}}$.", "Algebra", 1),  # 0.5 == 1/2 (math_verify): 1
        math(1, "4", "Algebra", "Level 3"),  # wrong: 0
        math(2, "2\\sqrt2", "Geometry", 3),  # 2\sqrt{2}: 1
        math(3, "9", "Geometry", "Level 5"),  # no box: 0
        math(4, "6", "Number Theory", 3),  # 2 samples, 1 right: 0.5
    ]
    outputs = [
        "x = \\boxed{0.5}",
        "\\boxed{3}",
        "The side is $\\boxed{2\\sqrt{2}}$",
        "it is 9",
        ["\\boxed{6}", "\\boxed{5}"],
    ]
    graded = grade_outputs(problems, outputs)
    assert [g.score for g in graded] == [1.0, 0.0, 1.0, 0.0, 0.5]
    assert graded[0].extracted == ["0.5"] and graded[0].reference == "\\frac{1}{2}"
    assert [g.level for g in graded] == ["1", "3", "3", "5", "3"]
    s = summarize(graded)
    assert s.overall.n == 5 and s.accuracy == pytest.approx(2.5 / 5)
    assert {k: (v.n, v.accuracy) for k, v in s.by_subject.items()} == {
        "Algebra": (2, 0.5),
        "Geometry": (2, 0.5),
        "Number Theory": (1, 0.5),
    }
    assert list(s.by_level) == ["1", "3", "5"]
    assert {k: (v.n, pytest.approx(v.accuracy)) for k, v in s.by_level.items()} == {
        "1": (1, 1.0),
        "3": (3, 1.5 / 3),
        "5": (1, 0.0),
    }
    assert s.reasons == {"correct": 3, "wrong": 2, "no_answer": 1} and s.samples_per_problem == 2
    d = s.to_dict()
    assert d["accuracy"] == 0.5 and d["by_level"]["3"] == {"n": 3, "correct": 1.5, "accuracy": 0.5}


def test_shared_references_score_100_percent(shared_data):
    """The reference solutions as outputs: 100% on the first problems of each shared test set."""
    from dqo_megatron.tasks.datasets import load_problems

    for rel in ("gsm8k/test.jsonl", "math/prm800k_split/test.jsonl"):
        problems = load_problems(shared_data / rel, limit=20)
        assert score_outputs(problems, [p.reference for p in problems]).accuracy == 1.0


def test_length_mismatch_and_empty_samples_are_errors():
    with pytest.raises(ValueError, match="2 problems but 1 outputs"):
        grade_outputs([gsm(0, "1"), gsm(1, "2")], ["#### 1"])
    with pytest.raises(ValueError, match="problem g0: no outputs"):
        grade_outputs([gsm(0, "1")], [[]])
