"""Command-line entry points. Thin by design: parse -> build a config -> call the library.

The library (everything outside `dqo_megatron.cli`) never imports typer.
Each area registers its commands in its own module; add a module here to add commands.
"""

from dqo_megatron.cli import (
    analysis,  # noqa: F401  (registers `value-analysis`)
    convert,  # noqa: F401
    data,  # noqa: F401
    demo,  # noqa: F401  (registers `demo`)
    general,  # noqa: F401  (registers `version`, `smoke`)
    rollout,  # noqa: F401  (registers `rollout`)
    train,  # noqa: F401  (registers `train`)
)
from dqo_megatron.cli import eval as _eval  # noqa: F401  (registers `process-scores`, `eval`)
from dqo_megatron.cli._app import app


def main() -> None:
    """Console-script entry point (`dqo-megatron`)."""
    app()


__all__ = ["app", "main"]
