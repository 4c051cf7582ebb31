"""Pearson, Spearman (ties averaged) and binned means against brute-force definitions."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dqo_megatron.analysis.correlation import binned_means, correlation_summary, pearson, rankdata, spearman


def brute_ranks(x) -> list[float]:
    """Rank of x[i] = 1 + #(smaller) + (#(equal, including itself) - 1) / 2: the mean of the ranks a
    run of ties occupies, by counting."""
    return [1 + sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


def brute_pearson(x, y) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


@pytest.mark.parametrize("seed", range(6))
def test_ranks_and_correlations_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    # few distinct values -> many ties (as 0/1 process scores), plus continuous values
    x = rng.integers(0, 4, size=n).astype(float) if seed % 2 else rng.normal(size=n)
    y = rng.integers(0, 3, size=n).astype(float) + (0 if seed % 3 else 0.1 * x)
    if len(set(x)) < 2 or len(set(y)) < 2:
        x[0], y[0] = x[0] + 1.0, y[0] + 1.0
    assert rankdata(x).tolist() == brute_ranks(list(x))
    assert pearson(x, y) == pytest.approx(brute_pearson(list(x), list(y)), abs=1e-12)
    assert spearman(x, y) == pytest.approx(brute_pearson(brute_ranks(list(x)), brute_ranks(list(y))), abs=1e-12)


def test_known_values():
    assert rankdata([10, 20, 10, 30]).tolist() == [1.5, 3.0, 1.5, 4.0]
    assert rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([]).tolist() == []
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but not linear: Spearman 1, Pearson < 1
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman(x, [v**3 for v in x]) == pytest.approx(1.0)
    assert pearson(x, [v**3 for v in x]) < 0.99
    # every permutation of 4 distinct values against the identity: the textbook 1 - 6 sum d^2 / (n(n^2-1))
    for perm in itertools.permutations(range(4)):
        d2 = sum((a - b) ** 2 for a, b in zip(range(4), perm))
        assert spearman(list(range(4)), list(perm)) == pytest.approx(1 - 6 * d2 / (4 * 15))


def test_degenerate_inputs():
    assert math.isnan(pearson([1.0], [2.0]))
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    s = correlation_summary([0.5, 0.5], [0.0, 1.0])
    assert s["pearson"] is None and "values constant" in s["reason"]
    s = correlation_summary([0.1], [1.0])
    assert s["spearman"] is None and "at least 2" in s["reason"]
    s = correlation_summary([0.1, 0.3, 0.2], [0.0, 1.0, 1.0])
    assert s["n"] == 3 and s["reason"] is None and -1 <= s["pearson"] <= 1
    with pytest.raises(ValueError, match="same length"):
        pearson([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="finite"):
        spearman([1, float("nan")], [1, 2])


def test_binned_means():
    scores = [0.0, 1.0, 0.0, 1.0, 0.5]
    values = [1.0, 3.0, 2.0, 5.0, 7.0]
    bins = binned_means(scores, values)  # 3 distinct scores: one bin each
    assert [(b["lo"], b["count"], b["mean"]) for b in bins] == [(0.0, 2, 1.5), (0.5, 1, 7.0), (1.0, 2, 4.0)]
    assert bins[0]["std"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=200), np.full(30, 0.25)])  # a block of ties stays in one bin
    y = 2 * x
    bins = binned_means(x, y, bins=5)
    assert sum(b["count"] for b in bins) == x.size
    assert all(a["hi"] < b["lo"] for a, b in zip(bins, bins[1:]))
    assert 4 <= len(bins) <= 5
    for b in bins:
        inside = (x >= b["lo"]) & (x <= b["hi"])
        assert inside.sum() == b["count"] and b["mean"] == pytest.approx(y[inside].mean())
