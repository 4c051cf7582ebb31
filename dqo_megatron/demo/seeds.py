"""The demo over several seeds, and the table of their mean +- std (`dqo-megatron demo --seeds 0,1,2`).

Each seed is a whole demo (its own problems, demonstrations, warm-up, rollouts and trained rows) in
`<run_dir>/seed<S>`; nothing is selected across seeds: every seed run is reported, and the table is
the mean +- sample standard deviation over them.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from dqo_megatron.config import ConfigError
from dqo_megatron.demo.config import DemoConfig
from dqo_megatron.demo.pipeline import MARKER, fresh_run_dir, run_demo


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, std = mean_std([scale * v for v in values])
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def seeds_table(results: list[dict]) -> str:
    """Markdown: one row per model, greedy and sampled test accuracy (%) as mean +- std over the seeds,
    then each seed's numbers."""
    seeds = [r["config"]["seed"] for r in results]
    names = list(results[0]["measured"]["accuracy"])
    lines = [
        f"| model | greedy (mean +- std, {len(seeds)} seeds) | sampled "
        f"| greedy per seed ({', '.join(map(str, seeds))}) |",
        "| --- | --- | --- | --- |",
    ]
    for name in names:
        greedy = [r["measured"]["accuracy"][name]["greedy"] for r in results]
        sample = [r["measured"]["accuracy"][name]["sample"] for r in results]
        lines.append(
            f"| {name} | {_fmt(greedy, 100)} | {_fmt(sample, 100)} | {' / '.join(f'{100 * g:.1f}' for g in greedy)} |"
        )
    return "\n".join(lines)


def value_table(results: list[dict]) -> str:
    """Markdown: per trained row, the held-out value analysis of its picked checkpoint over the seeds:
    per-step Pearson of V with the process score and the value drop at the first unsolvable step
    (token-level values: DQO rows), and V(x) vs the prompts' success rate (every row; DRO's only number)."""
    keys = ("pearson", "drop", "solvable_change", "initial_pearson")
    per_row: dict[str, dict[str, list[float]]] = {}
    for r in results:
        for row in r["measured"].get("value_analysis", []):
            stats = per_row.setdefault(row["label"], {k: [] for k in keys})
            for key in keys:
                value = row.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    stats[key].append(float(value))
    lines = [
        "| row | per-step Pearson r (V, process score) | value drop at the first unsolvable step | "
        "mean V change over solvable steps | V(x) vs prompt success, Pearson r |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, stats in per_row.items():
        cells = [
            _fmt(stats[k], digits=3)
            if stats[k]
            else "n/a (V trained at the prompt only)"
            if k != "initial_pearson"
            else "n/a"
            for k in keys
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(root: Path, results: list[dict]) -> str:
    """seeds.md in `root`: the accuracy and value tables over the seeds' demo.json results."""
    minutes = [r["seconds"] / 60 for r in results]
    text = (
        f"# DQO demo over {len(results)} seeds\n\nTest accuracy (%), {results[0]['config']['eval_problems']} "
        f"held-out problems per seed:\n\n{seeds_table(results)}\n\nValue analysis of the picked checkpoints "
        f"(held-out answers), mean +- std over the seeds:\n\n{value_table(results)}\n\n"
        f"Minutes per seed: {', '.join(f'{m:.1f}' for m in minutes)}.\n"
    )
    (root / "seeds.md").write_text(text)
    return text


def run_seeds(cfg: DemoConfig, seeds: list[int], echo: Callable[[str], None] = print) -> dict:
    """Run the demo once per seed under `cfg.run_dir`/seed<S>; write seeds.md and seeds.json there."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds}: give distinct seeds")
    root = Path(cfg.run_dir).absolute()
    with fresh_run_dir(root):
        (root / MARKER).write_text(json.dumps({"seeds": seeds, "status": "running"}))
        started = time.perf_counter()
        results = []
        for seed in seeds:
            echo(f"=== seed {seed} ===")
            results.append(run_demo(replace(cfg, seed=seed, run_dir=str(root / f"seed{seed}")), echo=echo))
        text = write_summary(root, results)
        summary = {
            "seeds": seeds,
            "status": "done",
            "seconds": time.perf_counter() - started,
            "runs": [str(root / f"seed{s}") for s in seeds],
            "table": text,
        }
        (root / MARKER).write_text(json.dumps(summary, indent=1))
    return summary
