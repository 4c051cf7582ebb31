"""The one Typer application; each `cli/<area>.py` registers its commands on it."""

import typer

app = typer.Typer(
    name="dqo-megatron",
    help="DQO (Direct Q-function Optimization) and offline-RL baselines on Megatron-Core.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """DQO (Direct Q-function Optimization) and offline-RL baselines on Megatron-Core."""
