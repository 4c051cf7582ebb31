"""megatron-core internals that moved between releases, one version-aware accessor each (issue #20).

Code that needs one of these internals asks here; the one exception is `checkpoint_integrity` (a leaf
below compat in the import stack), which imports `TorchCommonSaveStrategy` only where it exists.
Each accessor names what changed; `tests/test_megatron_api.py` fails when an upgrade moves
one again (instead of a silent fallback).

- CP batch slicing: `megatron.core.utils.get_batch_on_this_cp_rank` gained a required `is_hybrid_cp`
  in 0.19 (False with no `cu_seqlens` in the batch: the same zigzag as 0.16's).
- The torch_dist file writer our in-process save replaces: `FileSystemWriterAsync`'s staticmethod
  `write_preloaded_data_multiproc` (<= 0.16, a process per file) became `..._multithread` (0.19).
- The save strategy: 0.19's default writes one file per rank (thread_count 1), 0.16's two; we ask
  for two on every version so a checkpoint's files are the same whichever release wrote it.
"""

from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=1)
def _cp_slicer_takes_is_hybrid_cp() -> bool:
    from megatron.core.utils import get_batch_on_this_cp_rank

    return "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def get_batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """Megatron's load-balanced CP slice (chunks r and 2*cp-1-r): 0.16 `(batch, cp_group)`; 0.19 adds a
    required `is_hybrid_cp` (False + no `cu_seqlens` in the batch = the same per-sequence zigzag)."""
    from megatron.core.utils import get_batch_on_this_cp_rank as slicer

    if _cp_slicer_takes_is_hybrid_cp():
        return slicer(batch, is_hybrid_cp=False, cp_group=cp_group)
    return slicer(batch, cp_group=cp_group)


# Megatron's synchronous file writer: a staticmethod of FileSystemWriterAsync with the signature
# (transform_list, use_msc, rank, write_buckets, results_queue). <= 0.16 forks a process per file
# ("write_preloaded_data_multiproc"); 0.19 runs a thread per file ("write_preloaded_data_multithread").
WRITER_ATTRIBUTES = ("write_preloaded_data_multiproc", "write_preloaded_data_multithread")


def file_writer_attribute() -> str | None:
    """Name of this megatron-core's replaceable per-rank file writer, or None."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    for name in WRITER_ATTRIBUTES:
        if isinstance(FileSystemWriterAsync.__dict__.get(name), staticmethod):
            return name
    return None


def save_sharded_strategy(thread_count: int = 2):
    """torch_dist save strategy with `thread_count` files per rank on every version (0.16 defaulted to 2,
    0.19 to 1): the same file layout (``__<rank>_<i>.distcp``) whichever megatron-core wrote it."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=thread_count)
