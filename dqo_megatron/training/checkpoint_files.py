"""The on-disk layout of training checkpoints: names, markers, finding the one to resume from, and the
small files of ours (see `training.checkpointing` for the layout and the save/load protocol).

Everything here is re-exported by `training.checkpointing`, the module callers import.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from dqo_megatron.checkpoint_integrity import MANIFEST_FILE, is_damage, one_line
from dqo_megatron.outputs import fsync_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
EXTRA_STATE_FILE = "extra_state.pt"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"
_TRASH_PREFIX = ".trash_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model/optimizer it is loaded into."""

    user_facing = True
    """Its message says what is wrong and where: the CLI shows it as bad input, not as a bug."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint's files are missing, truncated or changed since the save (the message names the file).

    Resuming with ``train.resume=auto`` skips such a checkpoint for the previous one; any other use of it
    is an error."""


def step_dir_name(step: int) -> str:
    """``step_00000042`` for step 42 (the name of a checkpoint directory under the root)."""
    return f"step_{int(step):08d}"


# ------------------------------------------------------------------------------------------ finding
def is_complete(path: str | Path) -> bool:
    """Whether `path` is a checkpoint directory whose save finished (has the COMPLETE marker)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def read_marker(path: str | Path) -> dict:
    """The COMPLETE marker of checkpoint `path` (``{}`` for an empty legacy one).

    Raises CheckpointError when there is none, CheckpointDamaged when it is unreadable."""
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    try:
        text = marker.read_text().strip()
        value = json.loads(text) if text else {}
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"{marker}: unreadable ({one_line(err)})") from None
    if not isinstance(value, dict):
        raise CheckpointDamaged(f"{marker}: damaged (not a JSON object)")
    return value


def marker_says_manifest(marker: dict) -> bool:
    """Whether the save that wrote `marker` wrote a manifest (older saves did not)."""
    return marker.get("manifest") == MANIFEST_FILE


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``step_*`` directory under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _latest_named(root: Path) -> Path | None:
    """The complete checkpoint ``<root>/latest`` names, or None (with a warning when it names nothing usable)."""
    latest = root / LATEST_FILE
    if not latest.is_file():
        return None
    text = latest.read_text().strip()
    try:
        candidate = root / step_dir_name(int(text))
    except ValueError:
        logger.warning("checkpoint root %s: %s holds %r, not a step; scanning instead", root, latest, text)
        return None
    if is_complete(candidate):
        return candidate
    logger.warning(
        "checkpoint root %s: %s names %s, which is not a complete checkpoint; scanning for the newest complete one",
        root,
        latest,
        candidate.name,
    )
    return None


def resume_candidates(root: str | Path) -> list[Path]:
    """Complete checkpoints to resume from under `root`, in the order to try them (newest first).

    ``<root>/latest`` comes first when it names a complete ``step_*`` directory (so a run resumed from an
    older checkpoint keeps following its own line, even if newer directories of an abandoned line exist),
    then the complete checkpoints older than it. Otherwise (missing, unreadable, or pointing at an
    incomplete/removed directory) every complete ``step_*`` directory, newest first. ``.tmp_*``
    directories are never considered."""
    root = Path(root)
    found = list_checkpoints(root)
    named = _latest_named(root)
    if named is None:
        return [path for _, path in reversed(found)]
    step = int(_STEP_RE.match(named.name).group(1))
    return [named] + [path for s, path in reversed(found) if s < step]


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from under `root` (the first of `resume_candidates`), or None."""
    candidates = resume_candidates(root)
    return candidates[0] if candidates else None


def resolve_resume(root: str | Path | None, resume: str | None) -> Path | None:
    """What to resume from: ``"auto"`` -> `find_latest_checkpoint(root)` (None when there is none),
    ``"none"`` / ``""`` / None -> None, anything else -> that checkpoint directory.

    Raises FileNotFoundError / CheckpointError naming the path when an explicit checkpoint is missing or
    incomplete. (The trainer uses `checkpointing.resume_checkpoint`, which also skips damaged ones.)
    """
    choice = "" if resume is None else str(resume).strip()
    if choice.lower() in ("", "none"):
        return None
    if choice.lower() == "auto":
        return None if root is None else find_latest_checkpoint(root)
    path = Path(choice).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    if not is_complete(path):
        hint = ""
        if path.is_dir() and list_checkpoints(path):
            hint = " (it is a checkpoint root: use resume 'auto' or name one of its step_* directories)"
        elif _TMP_PREFIX in path.name:
            hint = " (a save that never finished)"
        raise CheckpointError(
            f"resume checkpoint {path} is not a complete checkpoint: no {COMPLETE_MARKER} marker{hint}"
        )
    return path


# ---------------------------------------------------------------------------------- file helpers
_PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def check_plain(obj: Any, where: str = "extra") -> None:
    """Raise TypeError (naming the place) unless `obj` is made of tensors, python scalars/strings and
    dicts/lists/tuples of those -- what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints keep "
        "only tensors, python scalars/strings and dicts/lists of them (convert with int(), "
        "float() or torch.tensor())"
    )


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` into `path`, fsync'd."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text` (tmp file + fsync + rename + directory fsync)."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of one of our files; CheckpointDamaged naming it when it is
    missing or unreadable (CheckpointError when it holds something else than our files do)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file whatever went wrong
        kind = CheckpointDamaged if is_damage(err) else CheckpointError
        raise kind(f"cannot read {path}: {one_line(err)}") from err
