"""Prompts, answer extraction and answer checking, on the real GSM8K / MATH files when present."""

from __future__ import annotations

import json
import multiprocessing as mp
import signal
import threading
import time

import pytest

from dqo_megatron.tasks import (
    GSM8K_INSTRUCTION,
    MATH_INSTRUCTION,
    build_messages,
    build_prompt,
    check_answer,
    extract_boxed,
    extract_gsm8k_answer,
    math_answers_equal,
    math_equiv,
    parse_number,
)


def _jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_prompts_match_paper():
    assert (
        build_prompt("gsm8k", "Q?")
        == "Q?\nPlease reason step by step, and produce a final answer following 4 '#', like '#### 0'."
    )
    assert build_prompt("MATH", "P") == "P\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert build_messages("math", "P") == [{"role": "user", "content": "P\n" + MATH_INSTRUCTION}]
    assert build_messages("gsm8k", "P", system="S")[0] == {"role": "system", "content": "S"}
    assert GSM8K_INSTRUCTION.endswith("'#### 0'.")
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt("aime", "P")
    with pytest.raises(ValueError, match="non-empty"):
        build_prompt("math", "  ")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so\n#### 72", "72"),
        ("#### 1,000\n", "1,000"),
        ("a #### 3 #### 4", "4"),
        ("#### $5.00.\nThanks", "$5.00."),
        ("no marker", None),
        ("####   \n", None),
        ("##### 7", "7"),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("x \\boxed{1} y \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\fbox{3} then \\boxed{4}", "4"),
        ("\\boxed{4} then \\fbox{ 5 }", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed 2$.", "2"),
        ("\\boxed{a{b}c}", "a{b}c"),
        ("\\boxed{unclosed", None),
        ("none", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "a,b,equal",
    [
        ("1,000", "1000", True),
        ("$5", "5.00", True),
        ("5.", "5", True),
        ("-3", "-3.0", True),
        ("50%", "50", True),
        ("1/2", "0.5", True),
        ("\\frac{1}{2}", ".5", True),
        ("\\boxed{7}", "7", True),
        ("7", "8", False),
        ("0.1", "0.10000001", False),
        ("7 apples", "7", False),
        ("1e3", "1000", True),
    ],
)
def test_gsm8k_numbers(a, b, equal):
    from dqo_megatron.tasks import numbers_equal

    assert numbers_equal(a, b) is equal


def test_gsm8k_wrong_and_missing():
    assert check_answer("gsm8k", "it is\n#### 71", "blah\n#### 72").reason == "wrong"
    assert check_answer("gsm8k", "it is 72", "blah\n#### 72").reason == "no_answer"
    v = check_answer("gsm8k", "#### $72.00", "#### 72")
    assert v.correct and v.extracted == "$72.00"
    assert parse_number("seventy") is None


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_gsm8k_reference_correct_against_itself(shared_data, split):
    recs = _jsonl(shared_data / "gsm8k" / f"{split}.jsonl")
    assert len(recs) == {"train": 7473, "test": 1319}[split]
    bad = [r["answer"][-40:] for r in recs if not check_answer("gsm8k", r["answer"], r["answer"]).correct]
    assert bad == []
    # and off by one is wrong for every record
    wrong = 0
    for r in recs:
        gold = parse_number(extract_gsm8k_answer(r["answer"]))
        wrong += not check_answer("gsm8k", f"#### {gold + 1}", r["answer"]).correct
    assert wrong == len(recs)


def _math_check(args):
    solution, answer = args
    return check_answer("math", solution, answer, timeout_s=5.0, exact_shortcut=False).correct


def test_math_reference_solutions_judged_correct(shared_data):
    """All 5000 MATH test solutions vs their `answer` field, through math_verify (no string shortcut),
    in 2 forked worker processes (the signal-based deadline must work there)."""
    recs = _jsonl(shared_data / "math" / "original" / "test.jsonl")
    assert len(recs) == 5000
    with mp.get_context("fork").Pool(2) as pool:
        ok = pool.map(_math_check, [(r["solution"], r["answer"]) for r in recs], chunksize=50)
    accuracy = sum(ok) / len(ok)
    failed = [r["answer"] for r, k in zip(recs, ok) if not k]
    assert accuracy >= 0.995, f"accuracy {accuracy:.4f}; first failures: {failed[:20]}"


def test_math_wrong_answers_judged_wrong(shared_data):
    """Each of 500 MATH solutions against another problem's answer that differs as a number or string:
    math_verify must call almost all of them wrong (a few may coincide, e.g. `\\frac12` vs `0.5`)."""
    recs = _jsonl(shared_data / "math" / "prm800k_split" / "test.jsonl")
    false_pos = 0
    for i, r in enumerate(recs):
        other = recs[(i + 1) % len(recs)]["answer"]
        if math_equiv.normalize_latex(other) == math_equiv.normalize_latex(r["answer"]):
            other = other + "+1"
        false_pos += check_answer("math", r["solution"], other, exact_shortcut=False).correct
    assert false_pos <= 2, false_pos


@pytest.mark.parametrize(
    "gold,pred,equal",
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}", True),
        ("(1,2)", "(1, 2)", True),
        ("2", "3", False),
        ("x^2+1", "1+x^2", True),
        ("\\pi", "3.14", False),
        ("10\\%", "10", True),
    ],
)
def test_math_equivalence_cases(gold, pred, equal):
    assert math_answers_equal(gold, pred, exact_shortcut=False).equal is equal


def test_math_no_answer_and_bad_reference():
    assert check_answer("math", "the answer is 5", "5").reason == "no_answer"
    assert check_answer("math", "\\boxed{5}", "\\boxed{").reason == "bad_reference"


def test_deadline_times_out_and_restores_outer_timer(monkeypatch):
    calls = []
    old = signal.signal(signal.SIGALRM, lambda s, f: calls.append("outer"))
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:

        def slow_parse(*a, **k):
            time.sleep(10)

        monkeypatch.setattr(math_equiv, "_mv", (slow_parse, lambda *a, **k: True))
        t0 = time.monotonic()
        res = math_answers_equal("1", "2", timeout_s=0.3)
        assert res.reason == "timeout" and not res.equal
        assert time.monotonic() - t0 < 2.0
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 1.0 < remaining < 3.0  # the outer 3 s timer is still armed, less the time spent
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert calls == []


def test_threads_use_helper_process():
    out = []
    t = threading.Thread(
        target=lambda: out.append(
            [
                math_answers_equal("\\frac{1}{2}", "0.5", exact_shortcut=False),
                math_answers_equal("x", "y", exact_shortcut=False),
            ]
        )
    )
    t.start()
    t.join(120)
    assert [(e.equal, e.reason) for e in out[0]] == [(True, "math_verify"), (False, "math_verify")]


def test_fallbacks(monkeypatch):
    monkeypatch.setattr(math_equiv, "_mv", False)
    assert math_answers_equal("\\dfrac{1}{2}", "\\frac{1}{2}", exact_shortcut=False) == math_equiv.Equivalence(
        True, "string_fallback"
    )
    assert math_answers_equal("\\frac{1}{2}", "0.5", exact_shortcut=False).equal is False

    def broken_start(self):
        raise OSError("no processes allowed")

    monkeypatch.setattr(math_equiv._Helper, "_start", broken_start)
    helper = math_equiv._Helper()
    assert helper.compare("2", " 2 ", 1.0).reason == "string_fallback"
    with pytest.raises(ValueError, match="timeout_s"):
        math_answers_equal("1", "1", timeout_s=0)
