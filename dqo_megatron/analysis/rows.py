"""The rows of value_analysis.jsonl: one per checkpoint, what each field means, and how to read them.

A row holds three kinds of numbers (docs/value-analysis.md has the table of fields):

* which checkpoint: ``checkpoint``, ``label``, ``kind``, ``run``, ``step``, ``algorithm``,
  ``value_target`` (``token``: V trained at every response state, dqo; ``prompt``: V(x) only, dro);
* what the data held: record counts by outcome, unscored and skipped records;
* what was measured: ``per_step`` (the correlation of V after each step with the step's score over all
  steps of all answers; None for a prompt-level value, with ``reason``), ``drop`` (the value drop at the
  first unsolvable step against the drop at steps that stay solvable, `drops.py`) and ``initial``
  (V(s0) / V(x) against each prompt's success rate). ``n``, ``pearson``, ``spearman`` and
  ``undefined_reason`` repeat ``per_step`` at the top level for scripts that read them.

Rows of several checkpoints of one run (the same ``run`` directory, distinct steps) form a trend
(`trend_groups`, drawn by `plot.plot_trend`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

RESULTS_FILE = "value_analysis.jsonl"
"""One JSON line per checkpoint, in `out_dir`."""


def json_safe(obj: Any) -> Any:
    """`obj` with non-finite floats replaced by None (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def build_row(ckpt, target: str, stats: dict[str, Any], meta: dict[str, Any], reason: Optional[str]) -> dict[str, Any]:
    """The row of one checkpoint (plot, pairs and seconds are filled by the caller).

    Args:
        ckpt: a `value_model.ValueCheckpoint`.
        target: ``token`` or ``prompt`` (`value_analysis.VALUE_TARGETS`).
        stats: `value_analysis.Analysis.stats`.
        meta: the data fields shared by all rows (score, counts, ...).
        reason: why there is no per-step number (prompt-level values), else None.
    """
    per_step = stats["per_step"]
    return {
        "checkpoint": str(ckpt.path.absolute()),
        "label": ckpt.label,
        "kind": ckpt.kind,
        "run": str(ckpt.run_dir.absolute()) if ckpt.run_dir is not None else None,
        "step": ckpt.step,
        "algorithm": ckpt.run.algorithm if ckpt.run is not None else None,
        "value_target": target,
        "value_mode": ckpt.value_mode,
        **meta,
        "per_step": per_step,
        "reason": reason,
        "n": per_step["n"] if per_step else None,
        "pearson": per_step["pearson"] if per_step else None,
        "spearman": per_step["spearman"] if per_step else None,
        "undefined_reason": per_step["reason"] if per_step else reason,
        "value_stats": stats["value"],
        "score_stats": stats["score"],
        "bins": stats["bins"],
        "drop": stats["drop"],
        "initial": stats["initial"],
        "plot": None,
        "trend_plot": None,
        "pairs": None,
    }


def _f(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def _drop_text(drop: dict[str, Any]) -> str:
    first, solv = drop.get("first_unsolvable"), drop.get("solvable")
    if not first or first["n"] == 0:
        return f"drop n/a ({drop.get('reason')})"
    text = f"drop at first unsolvable step {_f(first['mean'])} +- {first['std']:.4f} (n={first['n']})"
    if solv and solv["n"]:
        text += f" vs at solvable steps {_f(solv['mean'])} +- {solv['std']:.4f} (n={solv['n']})"
    return text


def format_row(row: dict[str, Any]) -> str:
    """One line for the console: label, algorithm, correlations, drops, V(s0), plot."""
    text = f"{row['label']}" + (f" [{row['algorithm']}]" if row.get("algorithm") else "") + ": "
    if row.get("per_step") is None:
        text += f"per-step n/a ({row.get('reason')})"
    else:
        text += f"Pearson {_f(row['pearson'])}  Spearman {_f(row['spearman'])}  steps {row['n']}"
        if row.get("undefined_reason"):
            text += f" ({row['undefined_reason']})"
    if row.get("drop"):
        text += "  | " + _drop_text(row["drop"])
    if row.get("initial"):
        init = row["initial"]
        name = "V(x)" if row.get("value_target") == "prompt" else "V(s0)"
        text += f"  | {name} vs prompt success: Pearson {_f(init['pearson'])} over {init['prompts']} prompts"
    return text + (f"  -> {row['plot']}" if row.get("plot") else "")


def trend_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows of training checkpoints grouped by run directory, keeping runs with more than one distinct
    step; each group sorted by step (the rows themselves, not copies)."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("run") and row.get("step") is not None:
            groups[row["run"]].append(row)
    return {run: sorted(g, key=lambda r: r["step"]) for run, g in groups.items() if len({r["step"] for r in g}) > 1}


def trend_file_names(runs: list[str]) -> dict[str, str]:
    """``trend_<run dir name>.png`` per run, with a numeric suffix where two runs share a name."""
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for run in runs:
        base = Path(run).name
        seen[base] = seen.get(base, 0) + 1
        names[run] = f"trend_{base}.png" if seen[base] == 1 else f"trend_{base}-{seen[base]}.png"
    return names


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a value_analysis.jsonl file (for comparing checkpoints)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
