"""The demo's report: accuracy table (laid out like the paper's Table 3), training curves, summary."""

from __future__ import annotations

from pathlib import Path

from dqo_megatron.demo.pipeline import read_metrics


def accuracy_table(accuracy: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per model, greedy and sampled accuracy (%) on the held-out problems."""
    lines = ["| model | held-out greedy | held-out sample |", "| --- | --- | --- |"]
    for name, acc in accuracy.items():
        lines.append(f"| {name} | {100 * acc['greedy']:.1f} | {100 * acc['sample']:.1f} |")
    return "\n".join(lines)


def summary_paragraph(cfg, measured: dict, seconds: float) -> str:
    """One paragraph saying what happened, with the numbers."""
    acc = measured["accuracy"]
    base = acc["base"]["greedy"]
    parts = [
        f"A tiny Llama-architecture GPT was warmed up by SFT on {cfg.demonstrations} demonstrations of column "
        f"addition that forget a due carry {100 * cfg.carry_drop:.0f}% of the time "
        f"({100 * measured['demonstrations_correct']:.0f}% of them correct). The resulting base policy answers "
        f"{100 * base:.1f}% of {cfg.eval_problems} held-out problems correctly with greedy decoding "
        f"({100 * measured['test_without_carry']:.0f}% of them need no carry) and {100 * acc['base']['sample']:.1f}% "
        f"when sampling. It then sampled {cfg.samples_per_problem} answers to each of {cfg.rollout_problems} "
        f"training problems ({100 * measured['rollout_accuracy']:.0f}% correct), which were labeled by answer "
        f"checking and used offline to train each algorithm for {cfg.rl_steps} steps from the base policy."
    ]
    for name in acc:
        if name == "base":
            continue
        g = acc[name]["greedy"]
        parts.append(f"{name} reached {100 * g:.1f}% greedy ({100 * (g - base):+.1f} points) and "
                     f"{100 * acc[name]['sample']:.1f}% sampled.")  # fmt: skip
    for row in measured.get("value_analysis", []):
        if isinstance(row.get("pearson"), float):
            parts.append(f"The value network of {row['label']} correlates with the synthetic process scores of "
                         f"held-out answers at Pearson {row['pearson']:.2f} over {row['n']} steps.")  # fmt: skip
    parts.append(f"Seed {cfg.seed}; the whole demo took {seconds / 60:.1f} minutes.")
    return " ".join(parts)


def plot_training_curves(runs: dict[str, Path], path: Path) -> Path:
    """PNG: the SFT loss, and DQO/DRO policy loss, value loss and KL to the reference per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for name, run_dir in runs.items():
        rows = read_metrics(run_dir)
        steps = [r["step"] for r in rows]
        if name == "SFT":
            axes[0].plot(steps, [r["loss"] for r in rows], label=name)
            continue
        for ax, key in zip(axes[1:], ("policy_loss", "value_loss", "kl_ref")):
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=name)
    for ax, title in zip(axes, ("warm-up (SFT) loss", "policy loss", "value loss", "KL to reference")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(ctx, seconds: float, done: list) -> list[Path]:
    """Write report.md (table, stage timings, summary) and training_curves.png into the run directory."""
    cfg, measured = ctx.cfg, ctx.measured
    runs = {"SFT": ctx.path("runs", "sft"), **{a.upper(): ctx.path("runs", a) for a in cfg.algorithms}}
    curves = plot_training_curves(runs, ctx.path("training_curves.png"))
    summary = summary_paragraph(cfg, measured, seconds)
    measured["summary"] = summary
    plots = sorted(p.name for p in ctx.path("value_analysis").glob("*.png"))
    stages = "\n".join(f"| {s.name} | {s.seconds:.1f} | {s.summary} |" for s in done)
    text = (f"# DQO demo (seed {cfg.seed})\n\n{accuracy_table(measured['accuracy'])}\n\n{summary}\n\n"
            f"Training curves: `training_curves.png`. Value vs process scores: "
            f"{', '.join(f'`value_analysis/{p}`' for p in plots) or 'none'}. Per-problem outputs: `eval/`.\n\n"
            f"| stage | seconds | result |\n| --- | --- | --- |\n{stages}\n")  # fmt: skip
    report = ctx.path("report.md")
    report.write_text(text)
    return [report, curves]
