"""Correlation statistics for the value analysis, in numpy only (no scipy).

* `pearson(x, y)`: the sample Pearson correlation, computed on centred data in float64.
* `rankdata(x)`: 1-based ranks with ties given the average of the ranks they span (scipy's
  ``rankdata(method="average")``).
* `spearman(x, y)`: Pearson of the average ranks (the usual definition with ties; it equals
  ``1 - 6 sum d^2 / (n (n^2 - 1))`` only without ties).
* `binned_means(x, y, bins)`: mean / std / count of `y` per bin of `x` (for the binned plot).

Degenerate inputs (fewer than 2 points, or a constant variable) have no correlation: the functions
return NaN, and `correlation_summary` reports None with the reason.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite (a non-finite value or score would poison the correlation)")
    return x, y


def pearson(x, y) -> float:
    """Pearson correlation of two equal-length 1-D arrays; NaN when n < 2 or either is constant.

    Args:
        x, y: ``[n]`` finite numbers.
    """
    x, y = _pair(x, y)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return math.nan
    r = float(dx @ dy) / math.sqrt(sxx * syy)
    return max(-1.0, min(1.0, r))


def rankdata(x) -> np.ndarray:
    """1-based ranks of ``x [n]`` (float64 ``[n]``), ties getting the mean of the ranks they occupy.

    Example: ``rankdata([10, 20, 10, 30]) == [1.5, 3, 1.5, 4]``.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = x.size
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.concatenate([[True], sorted_x[1:] != sorted_x[:-1]]))
    ends = np.concatenate([starts[1:], [n]])  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation (Pearson of average ranks, ties handled); NaN when undefined.

    Args:
        x, y: ``[n]`` finite numbers.
    """
    x, y = _pair(x, y)
    return pearson(rankdata(x), rankdata(y))


def binned_means(x, y, bins: int = 10, discrete_max: int = 12) -> list[dict[str, Any]]:
    """Statistics of `y` per bin of `x`, in increasing x.

    When `x` has at most `discrete_max` distinct values (process scores usually do: 0/1, or a few
    levels) each distinct value is its own bin (``lo == hi``); otherwise `bins` bins of (nearly)
    equal count by the quantiles of `x` (ties never split across bins).

    Args:
        x, y: ``[n]`` finite numbers.
    Returns:
        ``[{"lo", "hi", "count", "mean", "std"}]``: the bin's smallest and largest x, how many points
        it has, and the mean and (population) std of their y.
    """
    x, y = _pair(x, y)
    if x.size == 0:
        return []
    distinct = np.unique(x)
    if distinct.size <= discrete_max:
        groups = [x == v for v in distinct]
    else:
        # bin id = index of the quantile edge at or below each point; equal x share one bin
        edges = np.unique(np.quantile(x, np.linspace(0.0, 1.0, max(1, bins) + 1)[1:-1]))
        ids = np.searchsorted(edges, x, side="right")
        groups = [ids == b for b in np.unique(ids)]
    out = []
    for g in groups:
        xs, ys = x[g], y[g]
        out.append(
            {
                "lo": float(xs.min()),
                "hi": float(xs.max()),
                "count": int(g.sum()),
                "mean": float(ys.mean()),
                "std": float(ys.std()),
            }
        )
    return out


def correlation_summary(x, y) -> dict[str, Any]:
    """``{"n", "pearson", "spearman", "reason"}`` for JSON: the correlations as floats, or None with
    `reason` saying why they are undefined (too few points, constant x or y)."""
    x, y = _pair(x, y)
    out: dict[str, Any] = {"n": int(x.size), "pearson": None, "spearman": None, "reason": None}
    if x.size < 2:
        out["reason"] = f"{x.size} point(s): a correlation needs at least 2"
        return out
    const = [name for name, v in (("values", x), ("scores", y)) if np.all(v == v[0])]
    if const:
        out["reason"] = " and ".join(const) + " constant: the correlation is undefined"
        return out
    out["pearson"], out["spearman"] = pearson(x, y), spearman(x, y)
    return out
