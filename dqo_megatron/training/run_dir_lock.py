"""One run per run_dir: a lock file that a second run on the same directory refuses to start on.

Two runs on one run_dir overwrite each other's config.yaml and metrics, and one's checkpoint cleanup
deletes the other's save in progress. So rank 0 of a run holds ``run_dir/LOCK`` for the whole run:
an exclusive ``flock`` on the file (released by the kernel when the process ends, even by SIGKILL, so
a crashed run never leaves a stale lock behind) and, inside it, who holds it (host, pid, start time,
command) for the message the second run prints.

Filesystems without ``flock`` (some parallel filesystems mounted without it): the holder recorded in
the file decides instead. A holder on this host whose process is gone is stale and taken over; one on
another host cannot be checked from here, so the message says how to remove the lock by hand.
NFS mounted with ``nolock`` makes flock local to each client: two hosts would not see each other's lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from dqo_megatron.checkpoint_integrity import broadcast
from dqo_megatron.training.checkpoint_files import CheckpointError

logger = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirInUse(CheckpointError):
    """Another run holds the run directory (the message names it: host, pid, since when)."""


def _holder_info() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:300],
    }


def _read_holder(fd: int) -> dict | None:
    try:
        text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
        holder = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _alive_here(holder: dict) -> bool:
    """Whether `holder` is a live process on this host (a pid of another host cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def _in_use_message(path: Path, holder: dict | None) -> str:
    who = (
        f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}: "
        f"{holder.get('command', '?')})"
        if holder
        else "another process that is just starting"
    )
    return (
        f"run_dir {path.parent} is in use by {who}: a second run on it would overwrite its checkpoints. Wait for "
        f"that run to end, stop it, or give this run another run_dir. If no such run exists any more (e.g. it "
        f"ran on a host that is gone), delete {path}"
    )


class RunDirLock:
    """The lock of one run directory, held by this process (`acquire` / `release`)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirInUse naming the holder. Creates run_dir if needed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
            previous = _read_holder(fd)
            if previous and previous.get("pid") != os.getpid():
                logger.info("run_dir lock %s: taking over from %s (no longer running)", self.path, previous)
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(_in_use_message(self.path, _read_holder(fd))) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            holder = _read_holder(fd)  # no flock here: the recorded holder decides
            if holder and holder.get("pid") != os.getpid() and _alive_here(holder):
                raise RunDirInUse(_in_use_message(self.path, holder)) from None

    def release(self) -> None:
        """Give the lock up (the file stays, empty: deleting it would race with a run taking it)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path | None) -> Iterator[RunDirLock | None]:
    """Hold `run_dir`'s lock for the block, on rank 0 (or the only process); collective when
    torch.distributed is initialized: every rank raises RunDirInUse when rank 0 could not take it.
    Nothing happens without a run_dir."""
    import torch.distributed as dist

    if not run_dir:
        yield None
        return
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    lock, refusal = None, None
    if rank == 0:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except RunDirInUse as err:
            refusal = str(err)
        except OSError as err:  # shared, so that the other ranks do not wait for rank 0 forever
            refusal = f"cannot lock run_dir {run_dir} ({lock.path}): {type(err).__name__}: {err}"
    refusal = broadcast(refusal)
    if refusal is not None:
        raise RunDirInUse(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
