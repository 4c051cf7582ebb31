"""Where the project's shared, read-only data lives (never downloaded at run time)."""

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
