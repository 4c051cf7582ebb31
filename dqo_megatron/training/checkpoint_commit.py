"""The mechanics of `checkpointing.save_checkpoint`'s protocol, below the model and optimizer state.

A save (layout and order: `checkpointing`'s docstring) goes through these steps, each ending with every
rank agreeing on failure (`_gather_errors`, which doubles as a barrier, then `_raise_if_any`):

1. `_fresh_directory` (rank 0): ``.tmp_step_N`` under the root, after removing what killed saves left.
2. `_write_shards` (every rank, collective): the torch_dist files, errors returned rather than raised.
3. `_checksum_and_commit`: every rank checksums its own files; rank 0 then `_commit`s -- ``MANIFEST.json``,
   ``COMPLETE`` (fsync), `_publish` (the rename to ``step_N``), ``latest`` -- and `_prune`s.

A failure is ``(message, disk_full)`` (`_failure`): a full disk is named as such, once, and the partial
directory removed at once so that the next try has the space.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from dqo_megatron.checkpoint_integrity import (
    MANIFEST_FILE,
    ManifestError,
    all_gather,
    collect_manifest,
    manifest_bytes,
    save_error_message,
    write_manifest,
)
from dqo_megatron.training.checkpoint_files import (
    _TMP_PREFIX,
    _TRASH_PREFIX,
    COMPLETE_MARKER,
    FORMAT_VERSION,
    LATEST_FILE,
    CheckpointError,
    fsync_dir,
    list_checkpoints,
    write_text_atomically,
)


def _fresh_directory(root: Path, tmp: Path) -> tuple[str, bool] | None:
    """Rank 0: create `tmp` under `root` after removing what killed saves left (``.tmp_*``, never read)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        tmp.mkdir()
    except OSError as err:
        return _failure(err, tmp, f"cannot create {tmp}")
    return None


def _write_shards(state: dict, directory: Path) -> list[BaseException]:
    """`dist_checkpointing.save(state, directory)` as shipped (collective); the exceptions it raised or
    deferred (`conversion.torch_dist_save`: the files only rank 0 writes report instead of raising
    mid-protocol, and no process the save starts outlives a killed trainer)."""
    from dqo_megatron.conversion.torch_dist_save import torch_dist_save

    return torch_dist_save(state, directory)


def _failure(err: BaseException, directory: Path, doing: str, more: Sequence[BaseException] = ()) -> tuple[str, bool]:
    """``(message, disk_full)`` for a save error: the disk named when it is full, else the error in one line."""
    message, full = save_error_message([err, *more], directory)
    return (f"{doing}: {message}" if doing and not full else message), full


def _gather_errors(failure: tuple[str, bool] | None) -> list[tuple[int, str, bool]]:
    """Every rank's ``(rank, message, disk_full)``, on every rank; doubles as a barrier."""
    every = all_gather(failure)
    return [(rank, message, full) for rank, item in enumerate(every) if item is not None for message, full in [item]]


def _raise_if_any(errors: list[tuple[int, str, bool]], final: Path, tmp: Path) -> None:
    if not errors:
        return
    full = [e for e in errors if e[2]]
    if full:  # one disk for all: the same message from several ranks says it once
        listed = "; ".join(dict.fromkeys(message for _, message, _ in full))
    else:
        listed = "; ".join(f"rank {rank}: {message}" for rank, message, _ in errors)
    if full and torch.distributed.get_rank() == 0:  # its space is what the next try needs
        shutil.rmtree(tmp, ignore_errors=True)
    removed = "the partial checkpoint was removed, " if full else ""
    raise CheckpointError(
        f"saving checkpoint {final} failed ({listed}); {removed}the previous checkpoints are untouched"
    )


def _checksum_and_commit(
    root: Path, tmp: Path, final: Path, step: int, keep_last: int | None, keep_steps: Sequence[int]
) -> dict:
    """Every rank checksums the files it wrote into `tmp`, then rank 0 commits (manifest, marker, rename,
    latest) and prunes; a failure on any rank raises on every rank. Returns the manifest."""
    try:
        manifest = collect_manifest(tmp, exclude=(COMPLETE_MARKER,))
    except ManifestError as err:  # raised on every rank alike
        raise CheckpointError(
            f"saving checkpoint {final} failed: {err}; the previous checkpoints are untouched"
        ) from None
    failure = None
    if torch.distributed.get_rank() == 0:
        try:
            _commit(root, tmp, final, step, torch.distributed.get_world_size(), manifest)
            _prune(root, step, keep_last, keep_steps)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            failure = _failure(err, tmp, "")
    _raise_if_any(_gather_errors(failure), final, tmp)
    return manifest


def _write_marker(tmp: Path, step: int, world: int, manifest: dict) -> None:
    with open(tmp / COMPLETE_MARKER, "w") as f:
        json.dump(
            {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "world_size": world,
                "time": time.time(),
                "manifest": MANIFEST_FILE,
                "bytes": manifest_bytes(manifest),
            },
            f,
        )
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)  # the marker and everything written before it are durable before the rename


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (atomic on POSIX)."""
    trash = None
    if final.exists():  # os.replace cannot replace a non-empty directory: move the old one aside
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name}.{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _commit(root: Path, tmp: Path, final: Path, step: int, world: int, manifest: dict) -> None:
    write_manifest(tmp, manifest)  # before the marker: a complete checkpoint always has its manifest
    _write_marker(tmp, step, world, manifest)
    _publish(tmp, final)
    write_text_atomically(root / LATEST_FILE, f"{int(step)}\n")


def _prune(root: Path, step: int, keep_last: int | None, keep_steps: Sequence[int] = ()) -> None:
    """Delete complete checkpoints older than `step` beyond the newest ``keep_last - 1`` of them, except
    those of `keep_steps`.

    Newer directories (another line of the run) and incomplete ones are left alone. The marker goes
    first, so a deletion cut short leaves an ignored, incomplete directory rather than a broken one.
    """
    for trash in root.glob(f"{_TRASH_PREFIX}step_*"):
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last is None:
        return
    older = [(s, p) for s, p in list_checkpoints(root) if s < step]
    doomed = [(s, p) for s, p in older[: max(0, len(older) - (keep_last - 1))] if s not in set(keep_steps)]
    for _, path in doomed:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
