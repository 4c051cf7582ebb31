"""Child processes that end with their parent.

A worker pool (preprocess, label), a stage of the demo or a checkpoint writer that outlives a killed
parent keeps writing into outputs nobody owns any more, or prints tracebacks into a terminal that moved
on. Linux's ``PR_SET_PDEATHSIG`` has the kernel signal a child when its parent dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Make this process get `sig` when its parent dies (Linux ``PR_SET_PDEATHSIG``), and exit now if
    the parent (`parent_pid`) is already gone. Elsewhere: only the second part.

    Note: the signal fires when the parent *thread* that forked ends; fork from the main thread (or a
    thread that lives as long as the child should)."""
    with contextlib.suppress(AttributeError, OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def dies_with_this_process():
    """A callable for `preexec_fn` / a pool `initializer`: the child it runs in dies with this process."""
    return functools.partial(die_with_parent, os.getpid())
