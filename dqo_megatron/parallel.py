"""Distributed setup, in one place: torch.distributed from torchrun's environment + Megatron's
parallel state (TP, PP, virtual PP, CP, DP) + the model-parallel RNG seeds.

On a machine without CUDA this uses gloo and applies `dqo_megatron.compat.cpu` first; with CUDA it
uses NCCL and binds each process to `LOCAL_RANK`'s GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from dqo_megatron.config import ParallelConfig, data_parallel_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelInfo:
    """This process's place in the layout."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (its GPU index)."""
    tp_rank: int
    """Tensor-parallel rank."""
    pp_rank: int
    """Pipeline stage."""
    cp_rank: int
    """Context-parallel rank."""
    dp_rank: int
    """Data-parallel rank."""
    dp_size: int
    """Data-parallel size."""
    device: torch.device
    """Device this process computes on."""


def device_for_this_process() -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def initialize(parallel: ParallelConfig, seed: int = 1234, timeout_minutes: float = 10.0) -> ParallelInfo:
    """Initialize torch.distributed (if needed) and Megatron's parallel state; seed the RNGs.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as set by torchrun. Without them a
    single process (world size 1) is assumed, on a free local port. Raises ConfigError when the
    layout does not fit the world size.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from dqo_megatron.compat import apply_cpu_patches
    from dqo_megatron.compat.megatron_api import check_megatron_version

    check_megatron_version()  # before anything leans on an internal that may have moved
    cuda = torch.cuda.is_available()
    if not cuda:
        apply_cpu_patches()
    if not torch.distributed.is_initialized():
        launched = "RANK" in os.environ
        # Without torchrun: a one-process group on a free local port, leaving os.environ alone (a
        # RANK/MASTER_PORT set here would leak into every subprocess this program starts later).
        world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
        data_parallel_size(parallel, world_size)  # fail before any process blocks on a bad layout
        if cuda:
            torch.cuda.set_device(device_for_this_process())
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=None if launched else f"tcp://127.0.0.1:{find_free_port()}",
            rank=int(os.environ["RANK"]) if launched else 0,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    world_size = torch.distributed.get_world_size()
    dp_size = data_parallel_size(parallel, world_size)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
    )
    # Same seed on every data-parallel replica; Megatron offsets the TP-region seed by the TP rank.
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    info = ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=dp_size,
        device=device_for_this_process(),
    )
    if info.rank == 0:
        logger.info(
            "parallel layout: world=%d TP=%d PP=%d%s CP=%d DP=%d SP=%s backend=%s",
            world_size,
            parallel.tensor_model_parallel_size,
            parallel.pipeline_model_parallel_size,
            f" (VPP={parallel.virtual_pipeline_model_parallel_size})"
            if parallel.virtual_pipeline_model_parallel_size
            else "",
            parallel.context_parallel_size,
            dp_size,
            parallel.sequence_parallel,
            torch.distributed.get_backend(),
        )
    return info


def destroy() -> None:
    """Tear down Megatron's parallel state and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def find_free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unwrap(module: torch.nn.Module, found: Callable[[torch.nn.Module], bool], what: str) -> torch.nn.Module:
    """The first module, going inward through ``.module`` (Megatron DDP, Float16Module, our own
    wrappers), for which `found` is true; TypeError "<outer type> has no <what>" when none is.

    The one place that knows wrappers nest by ``.module``: e.g.
    ``unwrap(chunk, lambda m: hasattr(m, "decoder"), "decoder")`` is the GPTModel inside a DDP chunk."""
    inner = module
    while not found(inner) and hasattr(inner, "module"):
        inner = inner.module
    if not found(inner):
        raise TypeError(f"{type(module).__name__} has no {what}")
    return inner


def cp_local_positions(local_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global token positions held by `cp_rank` under Megatron's load-balanced CP layout.

    The sequence of length ``local_len * cp_size`` is cut into ``2*cp_size`` chunks; the rank holds
    chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` (so causal attention costs every rank the same).
    Returns ``[local_len]`` int64.
    """
    chunk = local_len // 2
    first = torch.arange(chunk, device=device) + cp_rank * chunk
    second = torch.arange(chunk, device=device) + (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, second])
