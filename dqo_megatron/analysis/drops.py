"""How much the value falls at the step where an answer becomes unsolvable.

A correlation of V with per-step scores pools all steps; on failed answers alone it mostly compares
early steps with late ones and reads a position trend. The sharper question is *local*: does V fall
exactly where the answer is lost, and not elsewhere? For a response with steps 1..K, write

    V(before step 1) = V(s0)          the value at the last prompt token (the state before any step)
    V(after step j)  = V at the token holding step j's last character (where `value_analysis` reads a step)
    V(before step j) = V(after step j-1)
    drop_j           = V(before step j) - V(after step j)

and split the steps of every scored response (`scores.StepPlan`) into

* **the first unsolvable step** k of each failed response that has one (`StepPlan.first_unsolvable`):
  ``drop_k``. The return of a failed answer is 0 from there on; before it, the answer could still be
  completed. A value that learned where credit goes has ``mean drop_k`` clearly > 0;
* **steps that stay solvable** (the steps before k of a failed response, every step of a correct one):
  ``drop_j``. A value that tracks solvability changes little here (it can rise as the answer nears its
  end); a value that only learned a position trend (V falls with length) drops as much here as at k.

``excess = mean drop at the first unsolvable step - mean drop at solvable steps`` separates the two.
Steps after k (unsolvable, already lost) are in neither group.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np


def step_drops(v0: float, after: np.ndarray) -> np.ndarray:
    """``drop_j = V(before step j) - V(after step j)`` of one response.

    Args:
        v0: V(s0), the value at the last prompt token.
        after: float ``[K]``: V after each step, in step order.
    Returns:
        float64 ``[K]``.
    """
    after = np.asarray(after, dtype=np.float64)
    before = np.concatenate([[float(v0)], after[:-1]])
    return before - after


def collect_drops(
    v0: Sequence[float],
    after: Sequence[np.ndarray],
    n_solvable: Sequence[int],
    first_unsolvable: Sequence[Optional[int]],
) -> tuple[np.ndarray, np.ndarray]:
    """The drops at first unsolvable steps and at steps that stay solvable, over many responses.

    Args (one entry per response):
        v0: V(s0).
        after: float ``[K_i]``: V after each (kept) step.
        n_solvable: how many leading steps stay solvable (``<= K_i``).
        first_unsolvable: index of the first unsolvable step (``< K_i``), or None.
    Returns:
        ``(first [m], solvable [q])`` float64: one drop per response with a first unsolvable step, and
        one per solvable step.
    """
    first, solvable = [], []
    for v, a, n, k in zip(v0, after, n_solvable, first_unsolvable):
        d = step_drops(v, a)
        solvable.append(d[: min(int(n), d.size)])
        if k is not None and k < d.size:
            first.append(d[k : k + 1])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.float64)  # noqa: E731
    return cat(first), cat(solvable)


def _stats(x: np.ndarray) -> dict[str, Any]:
    if x.size == 0:
        return {"n": 0, "mean": None, "std": None}
    return {"n": int(x.size), "mean": float(x.mean()), "std": float(x.std())}


def drop_summary(first: np.ndarray, solvable: np.ndarray, **counts: int) -> dict[str, Any]:
    """The JSON block: ``first_unsolvable`` and ``solvable`` (n, mean, std of the drops), ``excess``
    (difference of the means, None when either is empty), ``reason`` (why the drop is undefined, or None)
    and the given `counts` (e.g. failed responses without a first unsolvable step, sampler misses)."""
    out: dict[str, Any] = {
        "first_unsolvable": _stats(first),
        "solvable": _stats(solvable),
        "excess": None,
        "reason": None,
        **counts,
    }
    if first.size and solvable.size:
        out["excess"] = float(first.mean() - solvable.mean())
    if not first.size:
        out["reason"] = (
            "no failed response with a located first unsolvable step (failed responses need "
            "process_scores: `dqo-megatron process-scores`)"
        )
    return out
