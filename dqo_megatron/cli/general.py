"""General commands: `version`."""

from __future__ import annotations

import typer

from dqo_megatron.cli._app import app


@app.command()
def version() -> None:
    """Print the versions of dqo-megatron, torch, megatron-core and the optional GPU libraries."""
    from dqo_megatron.env_report import environment_report

    for name, value in environment_report().items():
        typer.echo(f"{name}: {value}")
