"""The one Typer application; each `cli/<area>.py` registers its commands on it.

Every command runs inside `_guarded`: an exception that reaches it becomes one line on stderr and an
exit code (2: bad input or environment, named by the message; 1: anything else), never a traceback.
`--debug` (before the command: `dqo-megatron --debug train ...`) or `DQO_DEBUG=1` lets the exception
through with its traceback, for bug reports.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil

import typer

from dqo_megatron.config.dtypes import DTYPE_HELP, canonical_dtype, torch_dtype_name
from dqo_megatron.errors import first_line

DEBUG_ENV = "DQO_DEBUG"
"""Environment variable that, set to 1 / true / yes, shows tracebacks (the same as --debug)."""

_state = {"debug": False}

# Errors of bad input or of the environment (a missing file, a full disk, an optional library not
# installed): their messages say what and where, so they are all the user needs. Other exception
# classes join them with a class attribute `user_facing = True` (CheckpointError, TrainingDiverged).
_INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError)


def debug_enabled() -> bool:
    """True under --debug or DQO_DEBUG=1."""
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _os_error_message(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        where = exc.filename or "."
        disk = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
        try:
            free = shutil.disk_usage(disk or ".").free / 2**20
            return f"no space left on device writing {where} ({free:.0f} MiB free); free space and rerun"
        except OSError:
            return f"no space left on device writing {where}; free space and rerun"
    return str(exc)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one-line message and exit code a command ends with when `exc` reaches the top."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"error: {_os_error_message(exc)}", 2
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, _INPUT_ERRORS) or getattr(exc, "user_facing", False):
        return f"error: {text}", 2
    return (
        f"error: {first_line(exc, 500)}\n(an unexpected error: rerun with --debug or {DEBUG_ENV}=1 for "
        "the traceback, and report it)"
    ), 1


def _guarded(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            import click

            if isinstance(exc, click.exceptions.ClickException) or debug_enabled():
                raise
            message, code = describe(exc)
            typer.echo(message, err=True)
            raise typer.Exit(code) from None

    return run


class GuardedTyper(typer.Typer):
    """A Typer whose commands end in one clear line, not a traceback (see the module docstring)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda fn: register(_guarded(fn))


app = GuardedTyper(
    name="dqo-megatron",
    help="DQO (Direct Q-function Optimization) and offline-RL baselines on Megatron-Core.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help=f"Show tracebacks of errors (also: {DEBUG_ENV}=1)."),
) -> None:
    """DQO (Direct Q-function Optimization) and offline-RL baselines on Megatron-Core."""
    _state["debug"] = debug


def configure_logging() -> None:
    """INFO lines with time and source for our modules; megatron's INFO lines dump whole configs."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)


def dtype_option(auto: str, torch_names: bool = False):
    """The `--dtype` option of every command: the spellings of `config/dtypes.py` (`bf16` = `bfloat16`,
    ...), `auto` meaning `auto`; the command receives the short name, or torch's (`torch_names`: what the
    generation backends hand to transformers and vLLM)."""

    def parse(value: str) -> str:
        try:
            return (torch_dtype_name if torch_names else canonical_dtype)(value, "--dtype")
        except ValueError as exc:
            raise typer.BadParameter(str(exc).removeprefix(f"--dtype={value!r}: ")) from None

    return typer.Option("auto", "--dtype", help=f"{DTYPE_HELP}; auto: {auto}.", callback=parse)
