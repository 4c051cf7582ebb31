"""`dqo-megatron demo`: the whole DQO loop on a tiny model, on a laptop CPU (thin: options -> DemoConfig)."""

from __future__ import annotations

import typer

from dqo_megatron.cli._app import app


@app.command()
def demo(
    run_dir: str = typer.Option("runs/demo", "--run-dir", "-o", help="Output directory (an earlier demo there is replaced)."),
    seed: int = typer.Option(0, help="Seed of problems, demonstrations, init, sampling and data order."),
    quick: bool = typer.Option(False, "--quick", help="Smaller sizes (CI): the same stages in under 3 minutes."),
    tp: int = typer.Option(1, "--tp", help="Tensor-parallel size of the Megatron stages (torchrun + gloo)."),
    pp: int = typer.Option(1, "--pp", help="Pipeline-parallel size of the Megatron stages."),
    rl_steps: int = typer.Option(100, help="Optimizer steps of DQO and of DRO."),
    samples_per_problem: int = typer.Option(8, "--samples", help="Samples per training problem (N)."),
) -> None:
    """Data, SFT warm-up, rollouts, labels, process scores, DQO and DRO training, evaluation: see docs/demo.md."""
    import warnings

    from dqo_megatron.config import ConfigError
    from dqo_megatron.demo import DemoConfig, run_demo

    # megatron/torch deprecation notices from in-process stages are noise in a demo's output
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")

    try:
        cfg = DemoConfig(run_dir=run_dir, seed=seed, quick=quick, tp=tp, pp=pp, rl_steps=rl_steps,
                         samples_per_problem=samples_per_problem)  # fmt: skip
        results = run_demo(cfg, echo=lambda line: typer.echo(line, err=True))
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
