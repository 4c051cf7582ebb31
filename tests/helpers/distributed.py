"""Run a test body in N gloo processes forked from the test process.

Ranks are not daemons: dist_checkpointing starts a multiprocessing manager inside them. Forking from a
process that already imported torch and megatron costs ~0.3-1 s per run, against ~9 s for torchrun,
so the many layout tests use this and one smoke test uses the real torchrun.
Each rank gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on a
free port. Failures of every rank are collected and reported together; a run that does not finish
within `timeout` seconds is killed and reported as hung instead of hanging the suite.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from typing import Any, Callable

import torch

from dqo_megatron.parallel import destroy, find_free_port


class DistributedTestError(AssertionError):
    """One or more ranks failed or hung."""


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 cores shared by all ranks; also keeps OpenMP out of forked children
    status, payload = "ok", None
    try:
        payload = fn(*args, **kwargs)
    except BaseException:  # noqa: BLE001 - report everything, including assertion errors
        status, payload = "error", traceback.format_exc()
    try:
        destroy()
    except Exception:  # noqa: BLE001
        pass
    # dist_checkpointing starts a multiprocessing manager on a process's first save; os._exit below
    # would orphan it (and each one holds ~270 MB), so stop every child this rank started.
    for child in mp.active_children():
        child.terminate()
        child.join(timeout=5)
    try:
        results.put((rank, status, _dumps(payload)))
    except Exception:  # noqa: BLE001
        results.put((rank, "error", _dumps(f"result of rank {rank} could not be sent:\n{traceback.format_exc()}")))
    results.close()
    results.join_thread()
    os._exit(0)  # skip pytest's atexit handlers inherited through fork


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on `world_size` forked ranks; return each rank's result (by rank).

    `fn` must initialize what it needs (e.g. `dqo_megatron.parallel.initialize`). Results travel
    through `torch.save`, so tensors and plain containers are fine.
    """
    import torch.distributed

    if torch.distributed.is_initialized():  # forked ranks would inherit it and hang on a dead group
        raise RuntimeError(
            "a process group is initialized in the test process itself (an earlier test ran "
            "Megatron in-process without tearing it down): run such code in a rank or subprocess"
        )
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results), daemon=False)
        for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    return collect_rank_results(procs, results, timeout)


def collect_rank_results(procs: list, results, timeout: float, error_cls: type | None = None) -> list:
    """Wait for one `(rank, status, blob)` per process in `procs` (until `timeout` s), stop the processes,
    and return the results by rank; raise `error_cls` (default DistributedTestError) naming every rank
    that failed, hung or died."""
    world_size = len(procs)
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(outcome) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, blob = results.get(timeout=min(remaining, 1.0))
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            continue
        outcome[rank] = (status, torch.load(io.BytesIO(blob), weights_only=False))
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = []
    for rank in range(world_size):
        if rank not in outcome:
            errors.append(
                f"rank {rank}: no result within {timeout:.0f} s (hung or crashed, exit code {procs[rank].exitcode})"
            )
        elif outcome[rank][0] == "error":
            errors.append(f"rank {rank} failed:\n{outcome[rank][1]}")
    if errors:
        raise (error_cls or DistributedTestError)("\n".join(errors))
    return [outcome[r][1] for r in range(world_size)]
