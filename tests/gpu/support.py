"""What the GPU tests share: skip markers with reasons, and ranks in *spawned* processes.

Why spawn (not fork, as `tests/helpers/distributed.py` does on CPU): CUDA cannot be used in a process
forked from one that has initialized it, and every test body here initializes CUDA. Spawned ranks
start a fresh interpreter (~5-10 s with torch + megatron) that imports the body by module path, so
bodies are module-level functions (`tests/gpu/bodies.py`). The pytest process itself never touches
a GPU context: results come back as CPU tensors, and every test's Megatron/TE global state dies with
its ranks.
"""

from __future__ import annotations

import functools
import io
import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

import pytest
import torch

CUDA = torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """CUDA devices visible to this process (0 without CUDA)."""
    return torch.cuda.device_count() if CUDA else 0


requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
"""Every GPU test carries this (with `pytest.mark.gpu`)."""


def requires_gpus(n: int):
    """Skip unless at least `n` GPUs are visible (reason names both numbers)."""
    return pytest.mark.skipif(gpu_count() < n, reason=f"needs {n} CUDA GPUs, {gpu_count()} visible here")


def te_status() -> tuple[bool, str]:
    """(usable, reason) of Transformer Engine here (`dqo_megatron.compat.transformer_engine_status`)."""
    from dqo_megatron.compat import transformer_engine_status

    return transformer_engine_status()


def requires_te():
    usable, reason = te_status()
    return pytest.mark.skipif(not usable, reason=f"needs Transformer Engine (NVIDIA's PyTorch container): {reason}")


def fp8_unsupported_reason(recipe: str) -> str | None:
    """Why `precision.fp8=recipe` cannot run here (None when it can): our checks on this device."""
    if not CUDA:
        return "needs a CUDA GPU: torch.cuda.is_available() is False here"
    usable, reason = te_status()
    if not usable:
        return f"needs Transformer Engine (NVIDIA's PyTorch container): {reason}"
    from dqo_megatron.config import PrecisionConfig
    from dqo_megatron.models.precision import (
        detect_hardware,
        fp8_support_problems,
        te_recipe_support,
    )

    problems = fp8_support_problems(PrecisionConfig(fp8=recipe), detect_hardware(), "te")
    if problems:
        return "; ".join(problems)
    verdict = te_recipe_support(recipe)
    if verdict is not None and not verdict[0]:
        return f"Transformer Engine says: {verdict[1]}"
    return None


class SpawnedRankError(AssertionError):
    """One or more spawned ranks failed or hung."""


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(_to_cpu(obj), buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    status, payload = "ok", None
    try:
        payload = fn(*args, **kwargs)
    except BaseException:  # noqa: BLE001 - report everything, assertion errors included
        status, payload = "error", traceback.format_exc()
    try:
        from dqo_megatron.parallel import destroy

        destroy()
    except Exception:  # noqa: BLE001
        pass
    for child in mp.active_children():  # dist_checkpointing's helpers
        child.terminate()
        child.join(timeout=5)
    try:
        blob = _dumps(payload)
    except Exception:  # noqa: BLE001
        status, blob = "error", _dumps(f"result of rank {rank} could not be sent:\n{traceback.format_exc()}")
    results.put((rank, status, blob))
    results.close()
    results.join_thread()


def run_spawned(fn: Callable, world_size: int, *args, timeout: float = 600.0, **kwargs) -> list:
    """Run ``fn(*args, **kwargs)`` on `world_size` spawned ranks (rank r on GPU r, torchrun's environment);
    return each rank's result, tensors moved to the CPU. `fn` must be importable by module path."""
    from dqo_megatron.parallel import find_free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results)) for r in range(world_size)
    ]
    for proc in procs:
        proc.start()
    from tests.helpers.distributed import collect_rank_results

    return collect_rank_results(procs, results, timeout, SpawnedRankError)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
