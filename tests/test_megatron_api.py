"""The version-aware accessors of `compat/megatron_api.py` find what they look for in the installed
megatron-core: an upgrade that moves one of these internals again fails here, by name, instead of a
silent fallback."""

from __future__ import annotations

import inspect

import torch

from dqo_megatron.compat import megatron_api


def test_the_save_strategy_writes_two_files_per_rank():
    strategy = megatron_api.save_sharded_strategy()
    assert strategy.thread_count == 2 and strategy.backend == "torch_dist"


def test_the_cp_slicer_is_called_as_this_release_wants():
    from megatron.core.utils import get_batch_on_this_cp_rank

    params = inspect.signature(get_batch_on_this_cp_rank).parameters
    assert ("is_hybrid_cp" in params) == megatron_api._cp_slicer_takes_is_hybrid_cp()
    assert "cp_group" in params


def test_the_cp_slicer_is_the_identity_without_context_parallelism(monkeypatch):
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 1)
    batch = {"tokens": torch.arange(8).view(1, 8)}
    from dqo_megatron.training.step import slice_batch_for_context_parallel

    assert slice_batch_for_context_parallel(batch) is batch
