"""Outputs that are never half-written and never destroy what they were made from.

Every command that writes a dataset, a checkpoint, a model directory or a records file goes through
one of the three stagers here, so the rules hold for all of them:

* **Written aside, renamed at the end.** The output is built in a temporary sibling (same directory,
  so the final `os.replace` is a rename on one filesystem, never a copy) and moved into place only when
  it is complete. A failure, a rejected record or a `kill -9` leaves at most a hidden
  `.NAME.partial-HOST-PID-*` sibling (removed by the next run on that host once PID is gone); whatever
  was at the output path before is untouched.
* **An existing output is refused** unless the caller passes `overwrite`; even then it is replaced
  only after the new one is complete (the old one is renamed aside first, then deleted).
* **An output that is, lies inside, or contains an input is refused in every mode** (`overwrite`
  included), compared after resolving symbolic links and, for existing files, by inode, so
  `convert megatron-to-hf ck ck` or `rollout p.jsonl -o p.jsonl` fail before any work.

`staged_file` (one file), `staged_dir` (a directory) and `staged_files` (a set of files that share a
prefix, e.g. a dataset's `.bin/.idx/.json`) differ only in what they rename. A multi-file swap is not
atomic as a whole: the old files are moved into a `.NAME.old-*` directory before the new ones arrive,
and the file that marks the set complete (a dataset's manifest) is moved last, so a kill during the
swap leaves either no marker (an incomplete set the readers refuse) and the old set recoverable beside
it, or the whole new set.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from dqo_megatron.paths import honour_umask

PathLike = str | os.PathLike
logger = logging.getLogger(__name__)


class OutputError(ValueError):
    """An output that may not be written: it exists (and no overwrite), or it would destroy an input."""


def _real(path: PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_apart(outputs: Iterable[PathLike], inputs: Iterable[PathLike]) -> None:
    """Raise OutputError when an output path equals an input, lies inside one, or contains one.

    Args:
        outputs: every path the command will create or replace.
        inputs: every path it reads (files or directories; missing ones are compared by name).
    """
    inputs = [(i, _real(i)) for i in inputs if i is not None and os.fspath(i) != ""]
    for out in outputs:
        real_out = _real(out)
        for given, real_in in inputs:
            if real_out == real_in or _same_file(real_out, real_in):
                how = "is"
            elif real_out.is_relative_to(real_in):
                how = "lies inside"
            elif real_in.is_relative_to(real_out):
                how = "contains"
            else:
                continue
            raise OutputError(
                f"output {out} {how} the input {given}: writing it would destroy the input "
                "(refused even with --overwrite); choose another output path"
            )


def refuse_special(path: PathLike) -> None:
    """OutputError when `path` exists as a device, pipe or socket: writing an output there and renaming it
    in would replace the node itself (e.g. /dev/null) with a file."""
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if mode and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise OutputError(f"output {path} is a device, pipe or socket, not a file: give a file path")


def refuse_existing(paths: Sequence[PathLike], overwrite: bool, what: str = "output") -> list[Path]:
    """The paths of `paths` that exist; OutputError when there are any and not `overwrite`, and always for a
    device, pipe or socket (a rename would replace the node itself, e.g. /dev/null, with a file)."""
    existing = [Path(p) for p in paths if os.path.lexists(p)]
    for p in existing:
        refuse_special(p)
    if existing and not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise OutputError(
            f"{what} already exists ({shown}); pass --overwrite to replace it (it is replaced only "
            "after the new one is complete)"
        )
    return existing


def _staging_prefix(name: str) -> str:
    """`.NAME.partial-HOST-PID-`: whose staging it is, so that a later run can tell a dead run's leftovers."""
    return f".{name}.partial-{socket.gethostname()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_staging(parent: Path, name: str) -> list[Path]:
    """Remove the staging leftovers (`.NAME.partial-HOST-PID-*`) of killed runs on this host in `parent`,
    and warn about `.NAME.old-*` directories (an output moved aside by a run killed mid-swap: possibly the
    only copy, so never deleted here). Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for entry in parent.glob(f".{glob.escape(name)}.partial-*"):
        rest = entry.name[len(f".{name}.partial-") :]
        owner, _, tail = rest.rpartition("-")
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d staging leftover(s) of killed runs beside %s", len(removed), parent / name)
    for entry in parent.glob(f".{glob.escape(name)}.old-*"):
        logger.warning(
            "%s: an earlier output moved aside by a run killed while replacing %s; restore it or remove it",
            entry,
            parent / name,
        )
    return removed


def _commit_file(tmp: Path, final: Path) -> None:
    honour_umask(tmp)  # mkstemp made it private; the output is not
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming_full_disk(path: PathLike) -> Iterator[None]:
    """Re-raise a full disk or quota (ENOSPC, EDQUOT) without a file name as one naming `path`: a failed
    `write` does not say which file it was writing, and the message should say which disk is full."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and not exc.filename:
            raise OSError(exc.errno, os.strerror(exc.errno), os.fspath(path)) from None
        raise


@contextlib.contextmanager
def staged_file(
    path: PathLike, *, overwrite: bool, inputs: Iterable[PathLike] = (), suffix: str = ""
) -> Iterator[Path]:
    """A temporary file beside `path` that becomes `path` when the block succeeds.

    Checks run before any work: `path` apart from `inputs`, not an existing directory, not existing
    unless `overwrite`. On error (or interrupt) the temporary file is removed and `path` is untouched.
    `suffix` ends the temporary file's name (for writers that pick the format by it).

    Yields:
        The temporary file's path (created, empty); write the whole output there.
    """
    final = Path(path).absolute()
    check_apart([final], inputs)
    if final.is_dir():
        raise OutputError(f"output {final} is a directory; give a file path")
    refuse_existing([final], overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(final.parent, final.name)
    fd, name = tempfile.mkstemp(prefix=_staging_prefix(final.name), suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with naming_full_disk(final):
            yield tmp
            _commit_file(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    """Create or replace `path` with `text` in one rename: readers never see half a file, and the file
    gets the permissions of the umask. For files a command owns and rewrites (manifests, sidecars,
    reports); an output a user names goes through `staged_file` and its refusals."""
    with staged_file(path, overwrite=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_file(path: PathLike, write: Callable[[Path], object]) -> None:
    """Create or replace `path` with what `write(tmp)` writes to the path `tmp` it is given, in one rename
    like `atomic_write_text`: for writers that want a path or open the file themselves (matplotlib's
    `savefig`).

    `tmp` is a unique sibling of `path` (`tempfile.mkstemp`: two processes writing the same path never
    share one) ending in `path`'s suffix, since writers such as `savefig` pick the format by it. It is
    fsynced and renamed over `path` when `write` returns; when `write` raises it is removed and `path` is
    left as it was."""
    with staged_file(path, overwrite=True, suffix=Path(path).suffix) as tmp:
        write(tmp)


@contextlib.contextmanager
def staged_dir(path: PathLike, *, overwrite: bool, inputs: Iterable[PathLike] = ()) -> Iterator[Path]:
    """A temporary directory beside `path` that becomes `path` when the block succeeds.

    Checks run before any work: `path` apart from `inputs`, not an existing file, not existing unless
    `overwrite`. On error the temporary directory is removed; on success an existing `path` is renamed
    aside, the new one renamed in, then the old one deleted.

    Yields:
        The temporary directory's path (created, empty).
    """
    final = Path(path).absolute()
    check_apart([final], inputs)
    if final.exists() and not final.is_dir():
        raise OutputError(f"output {final} exists and is not a directory")
    refuse_existing([final], overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(final.parent, final.name)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(final.name), dir=final.parent))
    try:
        with naming_full_disk(final):
            yield tmp
        honour_umask(tmp)  # mkdtemp / mkstemp made it private; the output is not
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_files(
    names: Sequence[PathLike], *, overwrite: bool, inputs: Iterable[PathLike] = (), what: str = "output"
) -> Iterator[Path]:
    """A temporary directory in which the caller writes files named like `names`; they replace `names`
    together when the block succeeds. `names[-1]` is the marker of a complete set (moved last).

    All of `names` must share one parent directory. Files among `names` that the block did not write
    are removed at the swap when they existed (a new set replaces the whole old set). Checks run before
    any work: every name apart from `inputs`, none existing unless `overwrite`.

    Yields:
        The temporary directory; write `<tmp>/<basename of each name>`.
    """
    finals = [Path(n).absolute() for n in names]
    parent = finals[0].parent
    if any(f.parent != parent for f in finals):
        raise ValueError(f"staged_files: {names} do not share one directory")
    check_apart(finals, inputs)
    refuse_existing(finals, overwrite, what)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_staging(parent, finals[-1].stem)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(finals[-1].stem), dir=parent))
    try:
        with naming_full_disk(finals[-1].parent):
            yield tmp
        honour_umask(tmp)
        _swap_files(tmp, finals)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_files(tmp: Path, finals: list[Path]) -> None:
    marker = finals[-1]
    old_files = [f for f in finals if os.path.lexists(f)]
    old = None
    if old_files:
        old = Path(tempfile.mkdtemp(prefix=f".{marker.stem}.old-", dir=marker.parent))
        # the marker first: from here on, readers see no complete old set, never a mix of old and new
        for f in sorted(old_files, key=lambda f: f != marker):
            os.replace(f, old / f.name)
    for f in finals:  # the marker last: the new set is visible only once complete
        staged = tmp / f.name
        if staged.exists():
            with open(staged, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(staged, f)
    fsync_dir(marker.parent)
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
