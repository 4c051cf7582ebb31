"""The value-analysis figure: per-step values against process scores, one PNG per checkpoint.

Left panel: every (score, value) pair as a point (scores jittered horizontally when they take few
distinct values, so that 0/1 scores do not collapse into two lines). Right panel: mean value per
score bin with one standard deviation as error bars and the bin's count, the form of the paper's
Figure 2. matplotlib is imported lazily with the non-interactive Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the value-analysis plot needs matplotlib (pip install matplotlib), or turn the plot "
                          "off (plot=False / --no-plot)") from exc  # fmt: skip
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def plot_values_vs_scores(values: np.ndarray, scores: np.ndarray, bins: list[dict[str, Any]], path: str | Path, *,
                          title: str, stats: dict[str, Any], score_label: str = "process score",
                          seed: int = 0) -> Path:  # fmt: skip
    """Write the two-panel figure to `path` (PNG) and return the path.

    Args:
        values: ``[n]`` V at the end of each step.
        scores: ``[n]`` the step's process score.
        bins: `dqo_megatron.analysis.correlation.binned_means(scores, values)`.
        title: first line of the title (the checkpoint's label).
        stats: `correlation_summary(values, scores)` (n, pearson, spearman).
        score_label: x-axis label.
        seed: seed of the horizontal jitter.
    """
    plt = _pyplot()
    values = np.asarray(values, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    distinct = np.unique(scores)
    x = scores
    if 0 < distinct.size <= 12:
        gap = float(np.min(np.diff(distinct))) if distinct.size > 1 else 1.0
        x = scores + np.random.default_rng(seed).uniform(-0.15, 0.15, size=scores.size) * gap
    left.scatter(x, values, s=8, alpha=0.8 if values.size < 200 else 0.35, linewidths=0)
    left.set_xlabel(score_label + (" (jittered)" if x is not scores else ""))
    left.set_ylabel("V(s) at the step's last token")
    left.set_title("every step")
    left.grid(alpha=0.3)
    if bins:
        centers = np.array([(b["lo"] + b["hi"]) / 2 for b in bins])
        means = np.array([b["mean"] for b in bins])
        stds = np.array([b["std"] for b in bins])
        right.errorbar(centers, means, yerr=stds, fmt="o-", capsize=4)
        for c, m, b in zip(centers, means, bins):
            right.annotate(f"n={b['count']}", (c, m), textcoords="offset points", xytext=(4, 6), fontsize=8)
    right.margins(x=0.1)
    right.set_xlabel(score_label)
    right.set_ylabel("mean V(s) +- std")
    right.set_title("binned by score")
    right.grid(alpha=0.3)
    fig.suptitle(f"{title}\nPearson {_fmt(stats.get('pearson'))}   Spearman {_fmt(stats.get('spearman'))}   "
                 f"n = {stats.get('n', values.size)} steps")  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
