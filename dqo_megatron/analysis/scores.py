"""The steps of a held-out record, their process scores and where the answer became unsolvable.

A step is a prefix of the response ending at a character offset (exclusive), as in `process_rewards`.
A prefix is *solvable* when the model can still reach a correct answer from it. The DQO paper
(section 4.4) estimates it by Monte Carlo: from the prefix, sample M completions; the prefix is
solvable when any is correct. `dqo-megatron process-scores` writes, for each failed response it scores,

    process_scores = {"step_ends": [e_1..e_K], "prefix_correct": [c_1..c_{K-1}], "num_completions": M, ...}

(the response split into K steps; c_k of the M completions of prefix k were correct; prefix K is the
whole response, whose outcome is known).

**All answers enter** (prefix score kinds). Scoring only failed responses compares early steps
(often still solvable) with late ones (the whole failed response is unsolvable), so the correlation
reads a position trend. Here every record with a known outcome contributes:

* a correct response: every prefix is solvable (the response itself completes it). Its steps are
  ``step_ends`` of its ``process_scores`` when it has them, else the response split with the
  splitter `process-scores` used (`SplitConfig`);
* a failed response with ``process_scores``: prefix k < K solvable iff ``c_k > 0``; prefix K (the
  whole response) unsolvable;
* a failed response without them: one step, the whole response, unsolvable (score 0);
* a record with neither ``process_scores`` nor a known outcome cannot be scored: skipped and counted.

The outcome is ``correct`` when given, else ``reward > 0``.

Score kinds (`SCORE_KINDS`), the score of step k:

* ``prefix_success``: ``c_k / M``, the Monte-Carlo success rate of completions of prefix k, where the
  record has ``process_scores`` (correct ones too); else 1.0 for a correct response. The whole
  response scores its outcome (1 / 0).
* ``prefix_solvable``: 1 if the prefix is solvable, else 0 (the paper's rule); every prefix of a
  correct response scores 1 (truly solvable, even where the sampler found no correct completion).
* ``process_reward`` (steps of ``process_rewards``): the step's reward as written in the record.
* ``return_to_go`` (steps of ``process_rewards``): the rewards on later tokens plus the outcome reward:
  the Monte-Carlo return V is trained to predict at lambda = 1, without the KL term.
* ``auto``: prefix_success when any record has ``process_scores``, else process_reward.

**The first unsolvable step** of a failed response with process scores: the step after the last
solvable prefix (k* = 1 + max{k : c_k > 0}, or 1 when none is). Solvability is monotone in truth (a
solvable prefix makes every shorter one solvable: the model can write the same steps again), so a
prefix before k* without a correct completion is a miss of the sampler (counted as
``sampler_misses``), the same reading as process-scores' default ``every_correct`` rewards. Steps
1..k*-1 *stay solvable*, step k* is where the answer is lost (see `drops.py`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import numpy as np

from dqo_megatron.config import ConfigError
from dqo_megatron.data.records import RecordError, TrajectoryRecord

ScoreKind = Literal["auto", "prefix_success", "prefix_solvable", "process_reward", "return_to_go"]
SCORE_KINDS = ("auto", "prefix_success", "prefix_solvable", "process_reward", "return_to_go")
"""Accepted values of `ValueAnalysisConfig.score` (see the module docstring)."""
PREFIX_KINDS = ("prefix_success", "prefix_solvable")
"""Score kinds read from solvability (process_scores and outcomes): the only ones with drop statistics."""
SCORE_LABELS = {
    "prefix_success": "fraction of correct completions from the prefix",
    "prefix_solvable": "prefix solvable (1/0)",
    "process_reward": "process reward of the step",
    "return_to_go": "reward after the step (return to go)",
}
"""Axis labels of the score kinds."""
PROCESS_SCORES_FIELD = "process_scores"
"""The record field written by `dqo-megatron process-scores` (kept in `TrajectoryRecord.extra`)."""


@dataclass
class SplitConfig:
    """How a correct response without ``process_scores`` is cut into steps (as `process-scores` cuts
    the failed ones: `dqo_megatron.process_scores.steps.split_steps`)."""

    splitter: str = "auto"
    split_pattern: Optional[str] = None
    max_steps: Optional[int] = None


@dataclass
class StepPlan:
    """The steps of one record before tokenization."""

    ends: list[int]
    """``[K]`` end character offsets of the steps (strictly increasing, the last may be len(response))."""
    outcome: Optional[float]
    """1.0 correct, 0.0 failed, None unknown (only for process_reward / return_to_go kinds)."""
    counts: Optional[list[int]] = None
    """``[K-1]`` correct completions per prefix (from ``process_scores``), None without them."""
    m: Optional[int] = None
    """M, the completions per prefix."""
    n_solvable: int = 0
    """How many leading steps are known to stay solvable (all K of a correct response; k*-1 of a failed
    one with process scores; 0 otherwise)."""
    first_unsolvable: Optional[int] = None
    """0-based index of the first unsolvable step (k*-1) of a failed response with process scores; None
    for correct responses and where it is unknown."""
    sampler_miss: bool = False
    """A prefix before the first unsolvable step had no correct completion (see the module docstring)."""


def resolve_score_kind(kind: str, records: Iterable[TrajectoryRecord]) -> str:
    """`kind`, with ``auto`` resolved: prefix_success if any record has ``process_scores``, else process_reward."""
    if kind != "auto":
        return kind
    return "prefix_success" if any(PROCESS_SCORES_FIELD in r.extra for r in records) else "process_reward"


def resolve_split(split: SplitConfig, splitter: Optional[str], records: Iterable[TrajectoryRecord]) -> SplitConfig:
    """The split for correct responses: `splitter` when given, else the one the records' ``process_scores``
    name (``splitter`` sub-field, when they all agree), else auto.

    Raises:
        ConfigError: a regex splitter without a pattern (the pattern is not recorded by process-scores).
    """
    from dqo_megatron.process_scores.steps import SPLITTERS

    if splitter is None:
        named = Counter(
            r.extra[PROCESS_SCORES_FIELD].get("splitter")
            for r in records
            if isinstance(r.extra.get(PROCESS_SCORES_FIELD), dict)
        )
        named.pop(None, None)
        splitter = next(iter(named)) if len(named) == 1 else "auto"
    if splitter not in SPLITTERS:
        raise ConfigError(f"splitter={splitter!r}: choose one of {list(SPLITTERS)}")
    if splitter == "regex" and not split.split_pattern:
        raise ConfigError(
            "the steps are split by a regex (process_scores.splitter or --splitter): give the same "
            "pattern with --split-pattern, so correct responses are cut like the failed ones"
        )
    return SplitConfig(splitter=splitter, split_pattern=split.split_pattern, max_steps=split.max_steps)


def outcome_of(rec: TrajectoryRecord) -> Optional[float]:
    """1.0 / 0.0 from ``correct`` when given, else from ``reward > 0``; None when the record has neither."""
    if rec.correct is not None:
        return float(rec.correct)
    return None if rec.reward is None else float(rec.reward > 0)


def parse_process_scores(rec: TrajectoryRecord) -> Optional[tuple[list[int], list[int], int]]:
    """``(step_ends [K], prefix_correct [K-1], num_completions)`` of a record's ``process_scores``, or None
    when it has none.

    Raises:
        RecordError (reason ``bad_process_scores``) naming file:line and the sub-field at fault.
    """
    raw = rec.extra.get(PROCESS_SCORES_FIELD)
    if raw is None:
        return None

    def bad(field: str, message: str) -> RecordError:
        return RecordError(
            "bad_process_scores", message, field=f"{PROCESS_SCORES_FIELD}{field}", file=rec.file, line=rec.line
        )

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if not isinstance(raw, dict):
        raise bad("", f"expected an object {{step_ends, prefix_correct, num_completions}}, got {type(raw).__name__}")
    ends, counts, m = raw.get("step_ends"), raw.get("prefix_correct"), raw.get("num_completions")
    if not is_int(m) or m < 1:
        raise bad(".num_completions", f"must be an integer >= 1, got {m!r}")
    if not isinstance(ends, list) or not ends or not all(is_int(e) for e in ends):
        raise bad(".step_ends", "must be a non-empty list of integer character offsets")
    prev = 0
    for i, e in enumerate(ends):
        if not prev < e <= len(rec.response):
            raise bad(
                f".step_ends[{i}]",
                f"offset {e} must be > {prev} (previous) and <= {len(rec.response)} (response length)",
            )
        prev = e
    if not isinstance(counts, list) or not all(is_int(c) for c in counts):
        raise bad(".prefix_correct", "must be a list of integer counts")
    if len(counts) != len(ends) - 1:
        raise bad(
            ".prefix_correct", f"{len(ends)} steps need {len(ends) - 1} counts (prefixes 1..K-1), got {len(counts)}"
        )
    for i, c in enumerate(counts):
        if not 0 <= c <= m:
            raise bad(f".prefix_correct[{i}]", f"{c} correct of {m} completions")
    return list(ends), list(counts), m


def plan_steps(rec: TrajectoryRecord, kind: str, split: SplitConfig) -> Optional[StepPlan]:
    """The steps of `rec` for score `kind` (resolved, not auto), see the module docstring.

    Returns:
        A `StepPlan` (``ends`` may be empty: a record without ``process_rewards`` under a reward kind), or
        None when a prefix kind cannot score the record (no ``process_scores`` and no known outcome).
    Raises:
        RecordError: a malformed ``process_scores``; ``process_scores`` without a known outcome (the last
        step's score is the outcome).
    """
    outcome = outcome_of(rec)
    if kind not in PREFIX_KINDS:
        return StepPlan(ends=[e for e, _ in rec.process_rewards], outcome=outcome)
    parsed = parse_process_scores(rec)
    if parsed is None:
        if outcome is None:
            return None
        if outcome == 0.0:  # only the whole response is known: unsolvable
            return StepPlan(ends=[len(rec.response)], outcome=0.0)
        from dqo_megatron.process_scores.steps import split_steps

        if not rec.response:  # nothing to split: the empty response is the single (terminal) step
            return StepPlan(ends=[0], outcome=1.0, n_solvable=1)
        ends = split_steps(rec.response, split.splitter, split.split_pattern, split.max_steps)
        return StepPlan(ends=ends, outcome=1.0, n_solvable=len(ends))
    ends, counts, m = parsed
    if outcome is None:
        raise RecordError(
            "missing_field",
            "needed as the score of the last step (the whole response)",
            field="reward",
            file=rec.file,
            line=rec.line,
        )
    if outcome == 1.0:
        return StepPlan(ends=ends, outcome=1.0, counts=counts, m=m, n_solvable=len(ends))
    solvable = [k for k, c in enumerate(counts) if c > 0]
    first = solvable[-1] + 1 if solvable else 0
    return StepPlan(
        ends=ends,
        outcome=0.0,
        counts=counts,
        m=m,
        n_solvable=first,
        first_unsolvable=first,
        sampler_miss=any(c == 0 for c in counts[:first]),
    )


def step_scores(rec: TrajectoryRecord, kind: str, plan: StepPlan, token_index: list[int]) -> np.ndarray:
    """Scores of the steps of `plan` (float64 ``[K]``), see the module docstring.

    Args:
        rec: the record.
        kind: a resolved score kind.
        plan: from `plan_steps`.
        token_index: the response token each step ends on (`step_token_indices`); used by return_to_go,
            where steps ending on the same token are all inside the state V is read at.
    """
    K = len(plan.ends)
    if kind in PREFIX_KINDS:
        if plan.outcome == 1.0 and (kind == "prefix_solvable" or plan.counts is None):
            return np.ones(K, dtype=np.float64)
        if plan.counts is None:  # failed, without process scores: the whole response
            return np.zeros(K, dtype=np.float64)
        c = plan.counts
        prefix = [x / plan.m for x in c] if kind == "prefix_success" else [float(x > 0) for x in c]
        return np.array(prefix + [plan.outcome], dtype=np.float64)
    rewards = np.array([r for _, r in rec.process_rewards], dtype=np.float64)
    if kind == "process_reward":
        return rewards
    if kind != "return_to_go":
        raise ValueError(f"score kind {kind!r}: choose one of {list(SCORE_KINDS[1:])} (auto must be resolved first)")
    if rec.reward is None:
        raise RecordError(
            "missing_field", "return_to_go scores need the outcome reward", field="reward", file=rec.file, line=rec.line
        )
    tok = np.asarray(token_index, dtype=np.int64)
    later = tok[None, :] > tok[:, None]  # [i, j]: step j's token comes after step i's
    return (later * rewards[None, :]).sum(axis=1) + float(rec.reward)
