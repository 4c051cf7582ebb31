"""The value-analysis figures: one PNG per checkpoint, one trend PNG per run with several checkpoints.

Token-level value (DQO), three panels:

1. every step as a point, its score on x (jittered when scores take few values, so 0/1 scores do not
   collapse into two lines) and V after the step on y;
2. the mean V per score bin with one standard deviation and the bin's count: the form of the
   paper's Figure 2;
3. histograms of the value drop ``V(before step) - V(after step)`` at the first unsolvable step of
   failed answers and at steps that stay solvable: a value that learned where answers are lost puts
   the first histogram to the right of the second.

Prompt-level value (DRO, V(x) only): V(x) (mean per prompt) against the prompt's success rate.

Trend (metric vs training step): the per-step Pearson / Spearman and the V(s0) or V(x) Pearson on the
left, the mean drops (+- std) on the right. matplotlib is imported lazily with the non-interactive Agg
backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from dqo_megatron.outputs import atomic_write_file


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the value-analysis plot needs matplotlib (pip install matplotlib), or turn the plot "
            "off (plot=False / --no-plot)"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    try:  # a unique temporary sibling renamed into place: concurrent or killed runs leave no half figure
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110))
    finally:
        plt.close(fig)
    return path


def _scatter_and_bins(left, right, values, scores, bins, score_label: str, seed: int) -> None:
    distinct = np.unique(scores)
    x = scores
    if 0 < distinct.size <= 12:
        gap = float(np.min(np.diff(distinct))) if distinct.size > 1 else 1.0
        x = scores + np.random.default_rng(seed).uniform(-0.15, 0.15, size=scores.size) * gap
    left.scatter(x, values, s=8, alpha=0.8 if values.size < 200 else 0.35, linewidths=0)
    left.set_xlabel(score_label + (" (jittered)" if x is not scores else ""))
    left.set_ylabel("V after the step (at its last token)")
    left.set_title("every step of every answer")
    left.grid(alpha=0.3)
    if bins:
        centers = np.array([(b["lo"] + b["hi"]) / 2 for b in bins])
        means = np.array([b["mean"] for b in bins])
        right.errorbar(centers, means, yerr=[b["std"] for b in bins], fmt="o-", capsize=4)
        for c, m, b in zip(centers, means, bins):
            right.annotate(f"n={b['count']}", (c, m), textcoords="offset points", xytext=(4, 6), fontsize=8)
    right.margins(x=0.1)
    right.set_xlabel(score_label)
    right.set_ylabel("mean V after the step +- std")
    right.set_title("binned by score")
    right.grid(alpha=0.3)


def _drop_hist(ax, first: np.ndarray, solvable: np.ndarray, drop: Optional[dict]) -> None:
    both = np.concatenate([first, solvable])
    if both.size:
        edges = np.histogram_bin_edges(both, bins=min(30, max(5, both.size // 5)))
        for data, label in ((solvable, "steps that stay solvable"), (first, "first unsolvable step")):
            if data.size:
                ax.hist(data, bins=edges, density=True, alpha=0.55, label=f"{label} (n={data.size})")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.legend(fontsize=8)
    title = "value drop per step"
    if drop and drop.get("first_unsolvable", {}).get("n"):
        title += (
            f"\nfirst unsolvable {_fmt(drop['first_unsolvable']['mean'])}, solvable {_fmt(drop['solvable']['mean'])}"
        )
    elif drop:
        title += "\n(no first unsolvable step located)"
    else:
        title += "\n(needs a prefix score kind)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("V(before step) - V(after step)")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)


def plot_checkpoint(analysis, row: dict[str, Any], path: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint's figure to `path` (PNG) and return the path.

    Args:
        analysis: `value_analysis.Analysis` (arrays: step values ``[n]`` and scores ``[n]``, drops
            ``[m]`` and ``[q]``, per-prompt V(s0) and success rates ``[p]``).
        row: the checkpoint's row (`rows.build_row`): label, score, per_step, drop, initial.
        seed: seed of the horizontal jitter.
    """
    from dqo_megatron.analysis.scores import SCORE_LABELS

    plt = _pyplot()
    if row.get("per_step") is None:  # prompt-level value: V(x) vs success rate
        fig, ax = plt.subplots(1, 1, figsize=(5.5, 4.5), constrained_layout=True)
        ax.scatter(analysis.prompt_success, analysis.prompt_values, s=14)
        ax.set_xlabel("prompt success rate over its held-out responses")
        ax.set_ylabel("V(x) at the last prompt token (mean per prompt)")
        init = row.get("initial") or {}
        ax.set_title(
            f"{row['label']} [{row.get('algorithm')}]: V(x) only\nPearson {_fmt(init.get('pearson'))}   "
            f"n = {init.get('prompts', 0)} prompts",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        return _save(fig, plt, path)
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.8), constrained_layout=True)
    _scatter_and_bins(
        left,
        mid,
        analysis.step_values,
        analysis.step_scores,
        row.get("bins") or [],
        SCORE_LABELS.get(row["score"], row["score"]),
        seed,
    )
    _drop_hist(
        right,
        analysis.first_drops,
        analysis.solvable_drops,
        row["drop"] if row.get("drop") and "first_unsolvable" in row["drop"] else None,
    )
    algo = f" [{row['algorithm']}]" if row.get("algorithm") else ""
    fig.suptitle(
        f"{row['label']}{algo}: V vs process score over all answers\nPearson {_fmt(row.get('pearson'))}   "
        f"Spearman {_fmt(row.get('spearman'))}   n = {row.get('n')} steps"
    )
    return _save(fig, plt, path)


def plot_trend(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Metrics of one run's checkpoints against the training step (rows sorted by step); returns `path`."""
    plt = _pyplot()
    steps = np.array([r["step"] for r in rows], dtype=np.float64)

    def series(get) -> np.ndarray:
        return np.array([np.nan if get(r) is None else get(r) for r in rows], dtype=np.float64)

    def dig(r, *keys):
        for k in keys:
            r = r.get(k) if isinstance(r, dict) else None
        return r

    token_level = any(r.get("per_step") is not None for r in rows)
    fig, axes = plt.subplots(
        1, 2 if token_level else 1, figsize=(12 if token_level else 6, 4.5), constrained_layout=True, squeeze=False
    )
    ax = axes[0, 0]
    if token_level:
        ax.plot(steps, series(lambda r: r.get("pearson")), "o-", label="per-step Pearson")
        ax.plot(steps, series(lambda r: r.get("spearman")), "s--", label="per-step Spearman")
    name = "V(s0)" if token_level else "V(x)"
    init = series(lambda r: dig(r, "initial", "pearson"))
    if np.isfinite(init).any():
        ax.plot(steps, init, "^:", label=f"{name} vs prompt success, Pearson")
    ax.set_xlabel("training step")
    ax.set_ylabel("correlation")
    ax.set_title("correlations over training")
    ax.axhline(0.0, color="k", lw=0.8)
    if ax.get_legend_handles_labels()[0]:  # every metric may be undefined (e.g. a zero head)
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if token_level:
        ax = axes[0, 1]
        for group, style in (("first_unsolvable", "o-"), ("solvable", "s--")):
            mean = series(lambda r: dig(r, "drop", group, "mean"))
            std = series(lambda r: dig(r, "drop", group, "std"))
            if np.isfinite(mean).any():
                label = "first unsolvable step" if group == "first_unsolvable" else "steps that stay solvable"
                ax.errorbar(steps, mean, yerr=np.nan_to_num(std), fmt=style, capsize=4, label=label)
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("mean V(before step) - V(after step) +- std")
        ax.set_title("value drop over training")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    run = Path(rows[0]["run"]).name if rows[0].get("run") else ""
    fig.suptitle(f"{run} [{rows[0].get('algorithm')}]: value analysis vs training step ({len(rows)} checkpoints)")
    return _save(fig, plt, path)
