"""`dqo-megatron demo`: the whole DQO loop on a tiny model, on a laptop CPU (thin: options -> DemoConfig)."""

from __future__ import annotations

from typing import Optional

import typer

from dqo_megatron.cli._app import app


@app.command()
def demo(
    run_dir: str = typer.Option(
        "runs/demo", "--run-dir", "-o", help="Output directory (an earlier demo there is replaced)."
    ),
    seed: int = typer.Option(0, help="Seed of problems, demonstrations, init, sampling and data order."),
    seeds: str = typer.Option(
        "",
        help="Comma-separated seeds (e.g. 0,1,2): one whole demo per seed in "
        "<run-dir>/seed<S>, and <run-dir>/seeds.md with mean +- std over them.",
    ),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes (CI): the same stages in under 3 minutes."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size of the Megatron stages (torchrun + gloo)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size of the Megatron stages."),
    digits: Optional[int] = typer.Option(
        None,
        help="Digits per operand: column steps per answer (default: the demo's, docs/demo.md; --quick uses at most 2).",
    ),
    rl_steps: Optional[int] = typer.Option(
        None,
        help="Policy optimizer steps of each trained row (DRO, DQO, "
        "DQO+PS), after the critic warm-up (default: the demo's, docs/demo.md).",
    ),
    samples_per_problem: Optional[int] = typer.Option(
        None, "--samples", help="Samples per training problem (N; default: the demo's)."
    ),
) -> None:
    """Data, SFT warm-up, rollouts, labels, process scores, DRO / DQO / DQO+PS training, evaluation, value
    analysis: see docs/demo.md."""
    from dqo_megatron.config import ConfigError
    from dqo_megatron.demo import DemoConfig, run_demo

    echo = lambda line: typer.echo(line, err=True)  # noqa: E731
    try:
        given = {"digits": digits, "rl_steps": rl_steps, "samples_per_problem": samples_per_problem}
        cfg = DemoConfig(
            run_dir=run_dir, seed=seed, quick=quick, tp=tp, pp=pp, **{k: v for k, v in given.items() if v is not None}
        )
        if seeds:
            from dqo_megatron.demo.seeds import run_seeds

            try:
                chosen = [int(s) for s in seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
            summary = run_seeds(cfg, chosen, echo=echo)
            typer.echo(summary["table"])
            typer.echo(f"per-seed reports: {run_dir}/seed<S>/report.md")
            return
        results = run_demo(cfg, echo=echo)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        typer.echo(f"demo failed: {exc}", err=True)
        raise typer.Exit(1) from None
    from dqo_megatron.demo.report import accuracy_table

    typer.echo(accuracy_table(results["measured"]["accuracy"]))
    typer.echo("")
    typer.echo(results["measured"]["summary"])
    typer.echo(f"\nreport: {run_dir}/report.md")
