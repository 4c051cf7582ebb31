"""What `tools/convert_checkpoint.py` and `tools/preprocess_data.py` share: the parser of Megatron-LM's flags.

The two tools are thin entry points run as `python tools/<name>.py` from a clone (they put the repository
root on `sys.path` before importing this). They take Megatron-LM's own flags with argparse (typer cannot
pass unknown options on), map them onto a `dqo-megatron` command and print one `note:` line per
difference in meaning. Errors are one line, like every dqo-megatron command's.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable


class MegatronFlagParser(argparse.ArgumentParser):
    """Errors end in one line (the usage is in --help), like every dqo-megatron command's."""

    def error(self, message: str):
        """Exit 2 with `PROG: error: MESSAGE` on one line, without argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag_parser(prog: str, description: str, epilog: str) -> MegatronFlagParser:
    """An empty parser for a tool's Megatron-LM flags; `epilog` (what differs from Megatron-LM) is shown as
    written, its columns kept."""
    return MegatronFlagParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def print_notes(notes: Iterable[str]) -> None:
    """One `note: ...` line on stderr for each flag whose meaning differs here."""
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
