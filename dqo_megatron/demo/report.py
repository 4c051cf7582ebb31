"""The demo's report: accuracy table (laid out like the paper's Table 3), training curves, summary."""

from __future__ import annotations

from pathlib import Path

from dqo_megatron.demo.config import ROWS
from dqo_megatron.demo.runs import read_metrics


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
        f"A tiny Llama-architecture GPT was warmed up by SFT on {cfg.demonstrations} demonstrations of "
        f"{cfg.digits}-digit column addition that forget a due carry {100 * cfg.carry_drop:.0f}% of the time "
        f"({100 * measured['demonstrations_correct']:.0f}% of them correct). The resulting base policy answers "
        f"{100 * base:.1f}% of {cfg.eval_problems} held-out test problems correctly with greedy decoding "
        f"({100 * measured['test_without_carry']:.0f}% of them need no carry) and {100 * acc['base']['sample']:.1f}% "
        f"when sampling. It then sampled {cfg.samples_per_problem} answers to each of {cfg.rollout_problems} "
        f"training problems ({100 * measured['rollout_accuracy']:.0f}% correct), which were labeled by answer "
        f"checking (and, for DQO+PS, given synthetic process scores) and used offline to train each row for "
        f"{cfg.rl_steps} steps from the base policy; each row's checkpoint was picked by greedy accuracy on "
        f"{cfg.validation_problems} validation problems every {cfg.eval_interval} steps."
    ]
    for algo in cfg.algorithms:
        name = ROWS[algo]
        g = acc[name]["greedy"]
        step = measured.get(f"{algo}_selection", {}).get("picked_step")
        parts.append(
            f"{name} (step {step}) reached {100 * g:.1f}% greedy ({100 * (g - base):+.1f} points) and "
            f"{100 * acc[name]['sample']:.1f}% sampled."
        )
    rows = measured.get("value_analysis", [])
    if rows:
        parts.append("Value analysis on held-out answers: " + "; ".join(describe_value_row(r) for r in rows) + ".")
    parts.append(f"Seed {cfg.seed}; the whole demo took {seconds / 60:.1f} minutes.")
    return " ".join(parts)


def describe_value_row(row: dict) -> str:
    """One line: DQO's per-step Pearson and drop, or DRO's V(x) correlation."""

    def num(x):
        return f"{x:.2f}" if isinstance(x, (int, float)) else "n/a"

    if row["value_target"] == "prompt":
        r = num(row["initial_pearson"])
        return f"{row['label']}: V(x) vs prompt success r = {r} (V is trained at the prompt only)"
    return (
        f"{row['label']}: Pearson {num(row['pearson'])} over {row['steps']} steps, value drop at the first "
        f"unsolvable step {num(row['drop'])} (solvable steps {num(row['solvable_change'])})"
    )


CURVES = (
    ("value_loss", "value loss", "1/2 w (V - G)^2 per token"),
    ("value_explained_var", "value fit", "explained variance of G by V"),
    ("log_ratio", "policy vs reference", "sum log pi/pi_ref per response"),
    ("validation", "validation accuracy", "greedy accuracy (%)"),
)
"""The RL panels: (key, title, y label). No panel shows the policy loss: at lambda = 1 it equals the value
loss by construction; what is policy-specific is how far the policy moved on correct vs incorrect answers."""


def plot_training_curves(sft_run: Path, runs: dict[str, Path], path: Path) -> Path:
    """PNG: the SFT warm-up loss, then per trained row: value loss, value explained variance, log-ratio to
    the reference on correct (solid) and incorrect (dashed) responses, and validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dqo_megatron.training.evals import read_evaluations

    fig, axes = plt.subplots(1, 1 + len(CURVES), figsize=(4 * (1 + len(CURVES)), 3.6))
    rows = read_metrics(sft_run)
    axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], color="gray")
    axes[0].set_title("warm-up (SFT)")
    axes[0].set_ylabel("NLL per response token")
    for k, (name, run_dir) in enumerate(runs.items()):
        color = f"C{k}"
        rows = read_metrics(run_dir)
        steps = [r["step"] for r in rows]
        for ax, (key, _, _) in zip(axes[1:], CURVES):
            if key == "log_ratio":
                ax.plot(
                    steps,
                    [r.get("log_ratio_correct", float("nan")) for r in rows],
                    color=color,
                    label=f"{name} correct",
                )
                ax.plot(
                    steps,
                    [r.get("log_ratio_incorrect", float("nan")) for r in rows],
                    color=color,
                    linestyle="--",
                    label=f"{name} incorrect",
                )
            elif key == "validation":
                evals = read_evaluations(run_dir)
                ax.plot([e.step for e in evals], [100 * e.accuracy for e in evals], marker="o", color=color, label=name)
            else:
                ax.plot(steps, [r.get(key, float("nan")) for r in rows], color=color, label=name)
    for ax, (_, title, ylabel) in zip(axes[1:], CURVES):
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(ctx, seconds: float, done: list) -> list[Path]:
    """Write report.md (table, stage timings, summary) and training_curves.png into the run directory."""
    cfg, measured = ctx.cfg, ctx.measured
    runs = {ROWS[a]: ctx.path("runs", a) for a in cfg.algorithms}
    curves = plot_training_curves(ctx.path("runs", "sft"), runs, ctx.path("training_curves.png"))
    summary = summary_paragraph(cfg, measured, seconds)
    measured["summary"] = summary
    plots = sorted(p.name for p in ctx.path("value_analysis").glob("*.png"))
    stages = "\n".join(f"| {s.name} | {s.seconds:.1f} | {s.summary} |" for s in done)
    text = (
        f"# DQO demo (seed {cfg.seed})\n\n{accuracy_table(measured['accuracy'])}\n\n{summary}\n\n"
        f"Training curves: `training_curves.png`. Value vs process scores: "
        f"{', '.join(f'`value_analysis/{p}`' for p in plots) or 'none'}. Per-problem outputs: `eval/`.\n\n"
        f"| stage | seconds | result |\n| --- | --- | --- |\n{stages}\n"
    )
    report = ctx.path("report.md")
    report.write_text(text)
    return [report, curves]
