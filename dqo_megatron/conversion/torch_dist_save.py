"""`dist_checkpointing.save` as shipped (torch_dist), for conversion and training checkpoints alike: its
writer is Megatron's own, with what our saves need around it.

- The files only rank 0 writes report their errors instead of raising between collectives
  (`checkpoint_integrity.deferred_single_rank_errors`).
- No process started by a save outlives a killed saver. Megatron's writer on megatron-core <= 0.16 forks
  a process per file: those get ``PR_SET_PDEATHSIG`` (`checkpoint_integrity.children_die_with_parent`).
  On every release it also starts, on a process's first save, a multiprocessing Manager for the write
  results -- a *spawned* interpreter (fork + exec, so no at-fork hook runs in it) that stays for the
  process's lifetime and, when the saver is killed, would stay forever. A small guardian process
  (`_GUARDIAN`, started before the first save) watches the saver and kills the children its saving
  thread spawned when it dies.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

from dqo_megatron.checkpoint_integrity import children_die_with_parent, deferred_single_rank_errors

_GUARDIAN = r"""
import os, select, signal, sys
parent, thread = int(sys.argv[1]), int(sys.argv[2])
try:
    parent_fd = os.pidfd_open(parent)
except OSError:
    sys.exit()
watched = {}

def children():
    try:
        with open(f"/proc/{parent}/task/{thread}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []

def spawned(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return b"--multiprocessing-fork" in f.read().split(b"\0")

while not select.select([parent_fd], [], [], 0.05)[0]:
    for pid in children():
        if pid not in watched and pid != os.getpid():
            try:
                if spawned(pid):
                    watched[pid] = os.pidfd_open(pid)
            except OSError:
                pass
for fd in watched.values():
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
"""
"""Runs beside a saver (argv[1]) until it ends; meanwhile it notes the children of its saving thread
(argv[2]: Megatron starts the Manager on that thread's first save) that multiprocessing spawned
(``--multiprocessing-fork`` in their command line) as pidfds, which no pid reuse can mislead, then
SIGKILLs those still alive. Polls one /proc file every 50 ms (the Manager takes ~0.1-1 s to start, so
it is noted before the save writes anything). Linux only (pidfd, /proc)."""

_guarded = {"pid": None, "process": None}


def _guard_spawned_children() -> None:
    """Start the guardian for this process once (again in a forked child: it is another saver)."""
    if _guarded["pid"] == os.getpid() or not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return
    thread = threading.get_native_id()
    if not os.path.exists(f"/proc/{os.getpid()}/task/{thread}/children"):
        return  # a kernel without CONFIG_PROC_CHILDREN: the guardian could not see the children
    try:
        _guarded["process"] = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARDIAN, str(os.getpid()), str(thread)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:  # no interpreter to start (embedded Python): save unguarded rather than not at all
        return
    _guarded["pid"] = os.getpid()


def torch_dist_save(state: dict, directory: str | Path) -> list[BaseException]:
    """`dist_checkpointing.save(state, directory)` with the torch_dist strategy of
    `compat.megatron_api.save_sharded_strategy` (two files per rank on every release); collective and
    synchronous. Returns the exceptions it raised or deferred (empty: saved), for the caller to share
    with every rank: a raise here would leave the other ranks waiting in the next collective."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from dqo_megatron.compat.megatron_api import save_sharded_strategy

    _guard_spawned_children()
    errors: list[BaseException] = []
    logged = _WriterErrors()
    writer_log = logging.getLogger(_WRITER_LOGGER)
    writer_log.addHandler(logged)
    try:
        with deferred_single_rank_errors(errors), children_die_with_parent():
            dist_checkpointing.save(state, str(directory), sharded_strategy=save_sharded_strategy())
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        errors.insert(0, exc)
    finally:
        writer_log.removeHandler(logged)
    if errors:
        errors += [RuntimeError(f"megatron-core's writer: {line}") for line in dict.fromkeys(logged.lines)]
    return errors


_WRITER_LOGGER = "megatron.core.dist_checkpointing.strategies.filesystem_async"


class _WriterErrors(logging.Handler):
    """The errors Megatron's file writer logs. Why: 0.19's threaded writer passes a worker's exception on
    as its class only (an assert on the result's type: "error: <class 'OSError'>"), having logged the
    exception's text first ("Local worker 1 encountered an error: [Errno 28] No space left on device"),
    which is what names a full disk."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
