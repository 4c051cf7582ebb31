"""Where the project's shared, read-only data lives (never downloaded at run time), and the permissions
of what the project writes."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "DQO_SHARED_DATA"
"""Environment variable naming the shared data directory (GSM8K, MATH, the tiny stories model)."""


def shared_data_dir() -> Path:
    """The shared data directory: ``$DQO_SHARED_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser().resolve()
    repo_root = Path(__file__).resolve().parent.parent
    return (repo_root.parent / "shared" / "data").resolve()


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give `path` (a file, or a directory and everything below it) the permissions a plain `open` /
    `mkdir` would have: 0o666 / 0o777 minus the umask. Staging directories (`tempfile.mkdtemp`, 0o700)
    and files (`mkstemp`, 0o600) are private by design; an output renamed from one must not stay so, or
    colleagues sharing a cluster directory cannot read it."""
    mask = current_umask()
    root = Path(path)
    entries = [root] + (list(root.rglob("*")) if root.is_dir() else [])
    for entry in entries:
        if entry.is_symlink():
            continue
        os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
