"""Eval reports: results.json, a Markdown table laid out like the paper's Table 3, and a PNG bar chart.

Table 3 of the paper has one row per model and the columns GSM8K greedy | GSM8K sample | MATH greedy |
MATH sample (accuracy in %, two decimals); we keep that order and append further datasets (MATH500, your
own) the same way. Below it: MATH accuracy per subject and per level for each model and decoding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dqo_megatron.eval.results import EvalResults
from dqo_megatron.outputs import atomic_write_file, atomic_write_text

MISSING = "–"
"""Shown for a cell that was not measured."""


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.2f}"


def table_columns(results: EvalResults) -> list[tuple[str, str, str]]:
    """(dataset name, decoding, column label) in table order: datasets as configured, then decodings."""
    return [(d.name, dec, f"{d.label} {dec}") for d in results.datasets for dec in results.config.decodings]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _breakdown(results: EvalResults, dataset: str, attr: str) -> list[str]:
    keys: list[str] = []
    for by_ds in results.scores.values():
        for s in by_ds.get(dataset, {}).values():
            keys += [k for k in getattr(s, attr) if k not in keys]
    if not keys:
        return []
    if attr == "by_level":
        keys.sort(key=lambda k: (not k.isdigit(), k.zfill(3)))
    else:
        keys.sort()
    rows = []
    first = None
    for model, by_ds in results.scores.items():
        for dec, s in by_ds.get(dataset, {}).items():
            groups = getattr(s, attr)
            first = first or groups
            rows.append([f"{model} ({dec})"] + [_pct(groups[k].accuracy) if k in groups else MISSING for k in keys])
    counts = ["problems"] + [str(first[k].n) if first and k in first else MISSING for k in keys]
    label = "Level " if attr == "by_level" else ""
    return _md_table(["model"] + [label + k for k in keys], rows + [counts])


def markdown_report(results: EvalResults) -> str:
    """results.md: the accuracy table (Table 3 layout), settings, and MATH per-subject / per-level tables."""
    cfg = results.config
    cols = table_columns(results)
    rows = [[name] + [_pct(results.accuracy(name, d, dec)) for d, dec, _ in cols] for name in cfg.names]
    out = ["# Accuracy (%)", ""] + _md_table(["model"] + [c[2] for c in cols], rows) + [""]
    counts = ", ".join(f"{d.label} {results.problems[d.name]}" for d in results.datasets)
    out.append(f"Problems: {counts}" + (f" (limit {cfg.limit}, {cfg.limit_mode})" if cfg.limit else "") + ".")
    if "greedy" in cfg.decodings:
        out.append(f"greedy: temperature 0, max_new_tokens {cfg.max_new_tokens}.")
    if "sample" in cfg.decodings:
        out.append(
            f"sample: temperature {cfg.temperature}, top_p {cfg.top_p}, top_k {cfg.top_k}, "
            f"{cfg.num_samples} sample(s) per problem (accuracy = mean over samples), "
            f"max_new_tokens {cfg.max_new_tokens}, seed {cfg.seed}."
        )
    out.append("Models: " + "; ".join(f"{n} = `{p}`" for n, p in zip(cfg.names, cfg.models)) + ".")
    for d in results.datasets:
        for attr, title in (("by_subject", "by subject"), ("by_level", "by level")):
            table = _breakdown(results, d.name, attr)
            if table:
                out += ["", f"## {d.label} {title} (%)", ""] + table
    return "\n".join(out) + "\n"


def write_png(results: EvalResults, path: str | os.PathLike) -> None:
    """A grouped bar chart of the table: one group per column, one bar per model, values on the bars."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display (servers, CI)
    import matplotlib.pyplot as plt

    cols = table_columns(results)
    names = results.config.names
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.9 + len(cols) * (0.6 + 0.35 * len(names)))), 4.5))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        vals = [results.accuracy(name, d, dec) for d, dec, _ in cols]
        bars = ax.bar(xs, [100 * v if v is not None else 0 for v in vals], width, label=name)
        for bar, v in zip(bars, vals):
            if v is not None:
                ax.annotate(
                    f"{100 * v:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{label}\n(n={results.problems[d]})" for d, _, label in cols], fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy by dataset and decoding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: EvalResults, output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and accuracy.png into `output_dir`; return their paths by kind."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "png": out / "accuracy.png"}
    atomic_write_text(paths["json"], json.dumps(results.to_dict(), indent=1, ensure_ascii=False) + "\n")
    atomic_write_text(paths["markdown"], markdown_report(results))
    atomic_write_file(paths["png"], lambda tmp: write_png(results, tmp))
    return paths
