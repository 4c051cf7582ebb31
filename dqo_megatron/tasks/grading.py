"""Judge a response's final answer against a reference: GSM8K numerically, MATH with math_verify."""

from __future__ import annotations

from dataclasses import dataclass

from dqo_megatron.tasks.answers import extract_boxed, extract_gsm8k_answer, numbers_equal, parse_number
from dqo_megatron.tasks.math_equiv import math_answers_equal
from dqo_megatron.tasks.prompts import check_task


@dataclass(frozen=True)
class Verdict:
    """The judgement of one response.

    correct: the extracted answer equals the reference.
    extracted: the response's final answer (None when the response has none).
    reason: "correct", "wrong", "no_answer" (no `####` / `\\boxed{}` in the response), "bad_reference"
      (the reference has no parsable answer), "timeout" or "error" (MATH comparison failed; counted
      as wrong).
    """

    correct: bool
    extracted: str | None
    reason: str


def reference_answer(task: str, reference: str) -> str | None:
    """The final answer inside a reference: a GSM8K solution's `#### N` or a MATH solution's last box.

    A reference without the marker is taken as the bare answer itself (MATH's `answer` field).
    """
    task = check_task(task)
    if task == "gsm8k":
        return extract_gsm8k_answer(reference) if "####" in reference else reference.strip() or None
    return extract_boxed(reference) if ("\\boxed" in reference or "\\fbox" in reference) else reference.strip() or None


def check_answer(
    task: str, response: str, reference: str, timeout_s: float = 5.0, exact_shortcut: bool = True
) -> Verdict:
    """Judge `response` (a model's full output) against `reference` (solution or bare answer).

    Args:
        task: "gsm8k" (answer after the last `####`, compared as numbers) or "math" (last
          `\\boxed{}`/`\\fbox{}`, compared with math_verify under a `timeout_s` deadline).
        response: the generated text.
        reference: the reference solution or the bare reference answer.
        timeout_s: MATH only: limit per comparison, seconds.
        exact_shortcut: MATH only: accept identical answer strings without calling math_verify.
    Returns:
        A `Verdict`.
    """
    task = check_task(task)
    gold = reference_answer(task, reference)
    if task == "gsm8k":
        pred = extract_gsm8k_answer(response)
        if gold is None or parse_number(gold) is None:
            return Verdict(False, pred, "bad_reference")
        if pred is None:
            return Verdict(False, None, "no_answer")
        ok = numbers_equal(gold, pred)
        return Verdict(ok, pred, "correct" if ok else "wrong")
    pred = extract_boxed(response)
    if gold is None:
        return Verdict(False, pred, "bad_reference")
    if pred is None:
        return Verdict(False, None, "no_answer")
    eq = math_answers_equal(gold, pred, timeout_s=timeout_s, exact_shortcut=exact_shortcut)
    if eq.reason in ("timeout", "error"):
        return Verdict(False, pred, eq.reason)
    return Verdict(eq.equal, pred, "correct" if eq.equal else "wrong")
