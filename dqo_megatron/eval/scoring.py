"""Score fixed model outputs: answer extraction + matching per problem, accuracy with MATH breakdowns.

Pure functions (no model, no files), so a test can check a hand-computed accuracy:

    graded = grade_outputs(problems, outputs)      # one GradedProblem per problem
    summary = summarize(graded)                    # accuracy overall, by subject, by level, verdict counts
    summary = score_outputs(problems, outputs)     # both

A problem's score is the fraction of its samples that are correct (1 sample: 0 or 1); accuracy is the
mean score over problems, so with several samples per problem it is the expected accuracy of one sample.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from dqo_megatron.tasks.datasets import Problem
from dqo_megatron.tasks.grading import check_answer, reference_answer


@dataclass
class GradedProblem:
    """One problem's outputs and their verdicts."""

    id: str
    """Problem id (`Problem.id`)."""
    task: str
    """"gsm8k" or "math"."""
    responses: list[str]
    """The model's outputs (one per sample)."""
    correct: list[bool]
    """Verdict per output."""
    extracted: list[str | None]
    """Final answer extracted from each output (None: none found)."""
    reasons: list[str]
    """Verdict reason per output: correct, wrong, no_answer, timeout, error, bad_reference."""
    reference: str | None
    """The reference's final answer."""
    subject: str | None = None
    """MATH subject (None for GSM8K)."""
    level: str | None = None
    """MATH level as a string ("1".."5"; None for GSM8K)."""

    @property
    def score(self) -> float:
        """Fraction of the outputs that are correct."""
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


@dataclass
class Accuracy:
    """Accuracy of a group of problems."""

    n: int = 0
    """Problems."""
    correct: float = 0.0
    """Sum of the problems' scores (the number of correct problems with one sample each)."""

    @property
    def accuracy(self) -> float:
        """correct / n (0 for an empty group)."""
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form: n, correct, accuracy (a fraction)."""
        return {"n": self.n, "correct": self.correct, "accuracy": self.accuracy}


@dataclass
class ScoreSummary:
    """Accuracy of one model on one dataset with one decoding."""

    overall: Accuracy = field(default_factory=Accuracy)
    by_subject: dict[str, Accuracy] = field(default_factory=dict)
    """MATH: per subject (sorted by name)."""
    by_level: dict[str, Accuracy] = field(default_factory=dict)
    """MATH: per level ("1".."5")."""
    reasons: Counter = field(default_factory=Counter)
    """Verdict reasons over all outputs."""
    samples_per_problem: int = 1

    @property
    def accuracy(self) -> float:
        """Overall accuracy (fraction)."""
        return self.overall.accuracy

    def to_dict(self) -> dict[str, Any]:
        """JSON form (accuracies as fractions; breakdowns keyed by subject / level)."""
        return {
            **self.overall.to_dict(),
            "samples_per_problem": self.samples_per_problem,
            "by_subject": {k: v.to_dict() for k, v in self.by_subject.items()},
            "by_level": {k: v.to_dict() for k, v in self.by_level.items()},
            "reasons": dict(sorted(self.reasons.items())),
        }


def _level(value: Any) -> str | None:
    """MATH levels come as 3 or "Level 3" (or "Level ?"): keep the part after "Level"."""
    if value is None:
        return None
    text = str(value).strip()
    return text[len("Level") :].strip() if text.lower().startswith("level") else text


def grade_outputs(
    problems: Sequence[Problem], outputs: Sequence[str | Sequence[str]], timeout_s: float = 5.0, progress: bool = False
) -> list[GradedProblem]:
    """Judge each problem's output(s) with `tasks.grading.check_answer`.

    Args:
        problems: the problems (task, reference, metadata subject/level).
        outputs: per problem, one output string or a list of sampled outputs (same order, same length).
        timeout_s: MATH: seconds per answer comparison (a timeout counts as wrong).
        progress: show a progress bar.
    Returns:
        One GradedProblem per problem, in order.
    """
    if len(problems) != len(outputs):
        raise ValueError(f"{len(problems)} problems but {len(outputs)} outputs")
    from tqdm import tqdm

    graded = []
    for p, out in zip(tqdm(problems, disable=not progress, unit="problem", desc="grade", leave=False), outputs):
        responses = [out] if isinstance(out, str) else list(out)
        if not responses:
            raise ValueError(f"problem {p.id}: no outputs")
        verdicts = [check_answer(p.task, r, p.reference, timeout_s=timeout_s) for r in responses]
        meta = p.metadata or {}
        graded.append(
            GradedProblem(
                id=p.id,
                task=p.task,
                responses=responses,
                correct=[v.correct for v in verdicts],
                extracted=[v.extracted for v in verdicts],
                reasons=[v.reason for v in verdicts],
                reference=reference_answer(p.task, p.reference),
                subject=meta.get("subject"),
                level=_level(meta.get("level")),
            )
        )
    return graded


def summarize(graded: Sequence[GradedProblem]) -> ScoreSummary:
    """Accuracy overall, per MATH subject and per MATH level, and verdict counts."""
    s = ScoreSummary()
    subjects: dict[str, Accuracy] = {}
    levels: dict[str, Accuracy] = {}
    for g in graded:
        s.overall.n += 1
        s.overall.correct += g.score
        s.reasons.update(g.reasons)
        for key, groups in ((g.subject, subjects), (g.level, levels)):
            if key is not None:
                acc = groups.setdefault(key, Accuracy())
                acc.n += 1
                acc.correct += g.score
    s.by_subject = dict(sorted(subjects.items()))
    s.by_level = dict(sorted(levels.items(), key=lambda kv: (not kv[0].isdigit(), kv[0].zfill(3))))
    s.samples_per_problem = max((len(g.responses) for g in graded), default=1)
    return s


def score_outputs(
    problems: Sequence[Problem], outputs: Sequence[str | Sequence[str]], timeout_s: float = 5.0
) -> ScoreSummary:
    """`summarize(grade_outputs(problems, outputs))`: the accuracy of fixed outputs."""
    return summarize(grade_outputs(problems, outputs, timeout_s=timeout_s))


def graded_to_dict(g: GradedProblem) -> dict[str, Any]:
    """JSON form of a GradedProblem (with its score)."""
    return {**asdict(g), "score": g.score}
