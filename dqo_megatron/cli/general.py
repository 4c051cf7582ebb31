"""General commands: `version`, `smoke`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dqo_megatron.cli._app import app, configure_logging


@app.command()
def version() -> None:
    """Print the versions of dqo-megatron, torch, megatron-core and the optional GPU libraries."""
    from dqo_megatron.env_report import environment_report

    for name, value in environment_report().items():
        typer.echo(f"{name}: {value}")


@app.command()
def smoke(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Config overrides, e.g. parallel.tensor_model_parallel_size=2"
    ),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see examples/configs/)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: train.train_steps)."),
) -> None:
    """Train the configured model for a few steps on random tokens under the configured layout.

    Single process: `dqo-megatron smoke`. Several: `torchrun --nproc-per-node 2 -m dqo_megatron smoke
    parallel.tensor_model_parallel_size=2`. Prints loss, grad norm and step time per step.
    """
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.training.smoke import run_smoke

    configure_logging()
    try:
        run = load_config(RunConfig, config, overrides or [])
        report = run_smoke(run, steps)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        steady = report.step_seconds[1:] or report.step_seconds
        typer.echo(
            f"smoke OK: world={report.world_size} steps={len(report.steps)} "
            f"final loss={report.steps[-1].loss:.4f} setup={report.setup_seconds:.2f}s "
            f"steady step={1e3 * sum(steady) / len(steady):.1f} ms"
        )
    from dqo_megatron.parallel import destroy

    destroy()
