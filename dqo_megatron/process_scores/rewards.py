"""From prefix solvability to step rewards: `assign_process_rewards` (modes in `ASSIGN_MODES`).

The modes and why they exist are described in `dqo_megatron.process_scores.scores`.
"""

from __future__ import annotations

from typing import Sequence

ASSIGN_MODES = ("last_correct", "every_correct", "value")
"""How prefix solvability becomes step rewards (`dqo_megatron.process_scores.scores` describes them)."""


def assign_process_rewards(
    ends: Sequence[int],
    correct_counts: Sequence[int],
    num_completions: int,
    assign: str = "every_correct",
    step_reward: float = 0.1,
) -> list[tuple[int, float]]:
    """Step rewards of one failed response, as `process_rewards` pairs (zero rewards left out).

    Args:
        ends: the K step end offsets (`split_steps`).
        correct_counts: for prefixes k = 1..K-1, how many of the M completions were correct (K-1 numbers).
        num_completions: M.
        assign: one of ASSIGN_MODES (described in `dqo_megatron.process_scores.scores`).
        step_reward: r.
    Returns:
        [(end offset of step k, reward), ...] in step order.
    """
    if len(correct_counts) != len(ends) - 1:
        raise ValueError(f"{len(ends)} steps need {len(ends) - 1} prefix counts, got {len(correct_counts)}")
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign={assign!r}: choose one of {list(ASSIGN_MODES)}")
    solvable = [k for k, c in enumerate(correct_counts, 1) if c > 0]
    last = solvable[-1] if solvable else 0
    if assign == "last_correct":
        return [(ends[last - 1], float(step_reward))] if last else []
    if assign == "every_correct":
        return [(ends[k - 1], float(step_reward)) for k in range(1, last + 1)]
    v = [c / num_completions for c in correct_counts] + [0.0]  # v_K = 0: the full response is wrong
    out = []
    for k in range(1, len(ends)):
        r = step_reward * (v[k - 1] - v[k])
        if r != 0.0:
            out.append((ends[k - 1], r))
    return out
