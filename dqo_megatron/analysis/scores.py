"""The process score of each step of a held-out record: what a step's value is compared with.

A step is a prefix of the response ending at a character offset (exclusive), as in `process_rewards`.
Two sources of steps and scores:

* ``process_scores`` (the record field `dqo-megatron process-scores` writes for each failed response it
  scores): ``{"step_ends": [e_1..e_K], "prefix_correct": [c_1..c_{K-1}], "num_completions": M, ...}``:
  the response was split into K steps and, from the prefix ending with step k < K, M completions were
  sampled, c_k of them correct. Prefix K is the whole response, whose outcome is known.
* ``process_rewards``: ``[[end, reward], ...]``, the per-step rewards of the data format (docs/data.md).
  `process-scores` writes them sparsely (by default only the last solvable step gets one), so they
  are the scores only for data whose every step carries its reward.

Score kinds (`SCORE_KINDS`), with the steps they use and the score of step k:

* ``prefix_success`` (steps of process_scores): ``c_k / M``, the Monte-Carlo success rate of completions
  of the prefix; for k = K the outcome (1 correct, 0 failed).
* ``prefix_solvable`` (steps of process_scores): 1 if ``c_k > 0`` (the paper's rule: the prefix is still
  solvable), else 0; for k = K the outcome.
* ``process_reward`` (steps of process_rewards): the step's reward as written in the record.
* ``return_to_go`` (steps of process_rewards): the rewards on later tokens (later steps' process
  rewards) plus the outcome reward: the Monte-Carlo return V is trained to predict, without the KL term.
* ``auto``: prefix_success when any record has ``process_scores``, else process_reward.

The outcome of a record is ``correct`` when given, else ``reward > 0``.
"""

from __future__ import annotations

from typing import Iterable, Literal, Optional

import numpy as np

from dqo_megatron.data.records import RecordError, TrajectoryRecord

ScoreKind = Literal["auto", "prefix_success", "prefix_solvable", "process_reward", "return_to_go"]
SCORE_KINDS = ("auto", "prefix_success", "prefix_solvable", "process_reward", "return_to_go")
"""Accepted values of `ValueAnalysisConfig.score` (see the module docstring)."""
PROCESS_SCORES_FIELD = "process_scores"
"""The record field written by `dqo-megatron process-scores` (kept in `TrajectoryRecord.extra`)."""
_FROM_PROCESS_SCORES = ("prefix_success", "prefix_solvable")


def resolve_score_kind(kind: str, records: Iterable[TrajectoryRecord]) -> str:
    """`kind`, with ``auto`` resolved: prefix_success if any record has ``process_scores``, else process_reward."""
    if kind != "auto":
        return kind
    return "prefix_success" if any(PROCESS_SCORES_FIELD in r.extra for r in records) else "process_reward"


def _outcome(rec: TrajectoryRecord) -> Optional[float]:
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
    where = {"file": rec.file, "line": rec.line}

    def bad(field: str, message: str) -> RecordError:
        return RecordError("bad_process_scores", message, field=f"{PROCESS_SCORES_FIELD}{field}", **where)

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
            raise bad(f".step_ends[{i}]", f"offset {e} must be > {prev} (previous) and <= {len(rec.response)} "
                                          "(response length)")  # fmt: skip
        prev = e
    if not isinstance(counts, list) or not all(is_int(c) for c in counts):
        raise bad(".prefix_correct", "must be a list of integer counts")
    if len(counts) != len(ends) - 1:
        raise bad(".prefix_correct", f"{len(ends)} steps need {len(ends) - 1} counts (prefixes 1..K-1), got "
                                     f"{len(counts)}")  # fmt: skip
    for i, c in enumerate(counts):
        if not 0 <= c <= m:
            raise bad(f".prefix_correct[{i}]", f"{c} correct of {m} completions")
    return list(ends), list(counts), m


def step_ends(rec: TrajectoryRecord, kind: str) -> list[int]:
    """End offsets of the record's steps for score `kind` (resolved, not auto); [] when it has none.

    Raises:
        RecordError: a malformed ``process_scores``, or a prefix kind on a record with ``process_scores``
        but neither ``correct`` nor ``reward`` (its last step's score is the outcome).
    """
    if kind in _FROM_PROCESS_SCORES:
        parsed = parse_process_scores(rec)
        if parsed is None:
            return []
        if _outcome(rec) is None:
            raise RecordError("missing_field", "needed as the score of the last step (the whole response)",
                              field="reward", file=rec.file, line=rec.line)  # fmt: skip
        return parsed[0]
    return [e for e, _ in rec.process_rewards]


def step_scores(rec: TrajectoryRecord, kind: str, token_index: list[int]) -> np.ndarray:
    """Scores of the steps given by `step_ends` (float64 ``[n_steps]``), see the module docstring.

    Args:
        rec: the record.
        kind: a resolved score kind.
        token_index: the response token each step ends on (`step_token_indices`); used by return_to_go,
            where steps ending on the same token are all inside the state V is read at.
    """
    if kind in _FROM_PROCESS_SCORES:
        parsed = parse_process_scores(rec)
        if parsed is None:
            return np.zeros(0, dtype=np.float64)
        _, counts, m = parsed
        outcome = _outcome(rec)
        prefix = [c / m for c in counts] if kind == "prefix_success" else [float(c > 0) for c in counts]
        return np.array(prefix + [outcome], dtype=np.float64)
    rewards = np.array([r for _, r in rec.process_rewards], dtype=np.float64)
    if kind == "process_reward":
        return rewards
    if kind != "return_to_go":
        raise ValueError(f"score kind {kind!r}: choose one of {list(SCORE_KINDS[1:])} (auto must be resolved first)")
    if rec.reward is None:
        raise RecordError("missing_field", "return_to_go scores need the outcome reward", field="reward",
                          file=rec.file, line=rec.line)  # fmt: skip
    tok = np.asarray(token_index, dtype=np.int64)
    later = tok[None, :] > tok[:, None]  # [i, j]: step j's token comes after step i's
    return (later * rewards[None, :]).sum(axis=1) + float(rec.reward)
