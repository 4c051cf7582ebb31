"""What our one-line error messages quote of another library's exception."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, cut at `limit` characters (libraries put whole tracebacks or
    multi-paragraph advice in their messages; a message of ours names the file and quotes only this)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
