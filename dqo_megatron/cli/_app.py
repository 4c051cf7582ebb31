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


def configure_logging() -> None:
    """INFO lines with time and source for our modules; megatron's INFO lines dump whole configs."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
