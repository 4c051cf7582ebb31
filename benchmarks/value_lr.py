"""The measurement behind `value.lr_ratio`: how well the value network fits, by learning rate.

On a finished demo run (`dqo-megatron demo --run-dir D`), for each ratio R the value network alone is
fitted (the policy frozen: `value.warmup_steps = train_steps`, so the data stays on-policy and every
importance weight is 1) with `value.lr = R x train.lr`, from the demo's DQO config (same data, steps,
batch). Reported per ratio: the value's explained variance of the returns on the training batches
(mean of the last 10 steps), and on the held-out answers of the demo's value analysis the per-step
Pearson of V with the process score and the mean value drop at the first unsolvable step.

    python benchmarks/value_lr.py --demo runs/demo --ratios 1 3 10 30 100 [--steps 100] [--out /tmp/value_lr]

Prints a Markdown table (and writes it to <out>/value_lr.md). CPU, one process per fit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def fit(demo: Path, ratio: float, steps: int, out: Path, name: str = "dqo") -> Path:
    """Run the value-only fit for one ratio; returns its run directory."""
    run_dir = out / f"ratio_{ratio:g}"
    overrides = [
        f"run_dir={run_dir}",
        f"value.lr_ratio={ratio}",
        f"value.warmup_steps={steps}",
        f"train.train_steps={steps}",
        "eval.interval=0",
        "train.keep_last_checkpoints=1",
    ]
    cmd = [sys.executable, "-m", "dqo_megatron", "train", "-c", str(demo / "configs" / f"{name}.yaml"), *overrides]
    with open(out / f"ratio_{ratio:g}.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"training failed for ratio {ratio}: see {out}/ratio_{ratio:g}.log")
    return run_dir


def analyse(demo: Path, run_dir: Path, out: Path) -> dict:
    """Held-out value analysis of the fit's final checkpoint (the demo's records and tokenizer)."""
    from dqo_megatron.analysis.value_analysis import ValueAnalysisConfig, run_value_analysis
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
    from dqo_megatron.demo.stages import value_summary
    from dqo_megatron.training.checkpointing import find_latest_checkpoint

    seq = json.loads((demo / "demo.json").read_text())["measured"]["seq_length"]
    tokenize = TokenizeConfig(tokenizer=TokenizerConfig(path=str(demo / "tokenizer.model")), max_length=seq + 1)
    (row,) = run_value_analysis(
        ValueAnalysisConfig(
            checkpoints=[str(find_latest_checkpoint(run_dir / "checkpoints"))],
            records=[str(demo / "analysis_scored.jsonl")],
            tokenize=tokenize,
            out_dir=str(out / f"analysis_{run_dir.name}"),
            skip_invalid=True,
            plot=False,
        )
    )
    return value_summary(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="a finished demo run directory")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1, 3, 10, 30, 100])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("/tmp/value_lr"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| value.lr_ratio | value.lr | explained variance (train, last 10 steps) | held-out Pearson | "
        "drop at first unsolvable step | change over solvable steps |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ratio in args.ratios:
        run_dir = fit(args.demo, ratio, args.steps, args.out)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        ev = [r["value_explained_var"] for r in rows[-10:]]
        lr = json.loads((args.demo / "demo.json").read_text())["config"]["rl_lr"] * ratio
        s = analyse(args.demo, run_dir, args.out)
        lines.append(
            f"| {ratio:g} | {lr:.1e} | {sum(ev) / len(ev):.3f} | {s['pearson']:.3f} | {s['drop']:.3f} | "
            f"{s['solvable_change']:.3f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    (args.out / "value_lr.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
