"""Parallel layouts under NCCL reproduce one GPU: logits, loss, grad norm and weights after an SGD step.

The CPU suite checks the same under gloo (tests/test_parallel_layouts.py); here the CUDA paths run:
NCCL collectives, CUDA RNG tracker, batched p2p, CUDA kernels. fp32 with TF32 off, so that
differences are only the order of sums: the CPU suite's bound (2e-5 relative) plus GPU kernels'
own reordering (cuBLAS split-K, SDPA tiles, atomics in attention backward) gives 1e-4 relative to
the tensor's scale, still far below a real bug (a wrong shard or a missing all-reduce moves values by
1e-1..1e0). Layouts run where the GPU count allows (torch.cuda.device_count()).
"""

from __future__ import annotations

import functools

import pytest

from dqo_megatron.config import ParallelConfig
from tests.gpu.bodies import layout_deviation, layout_reference
from tests.gpu.support import requires_cuda, requires_gpus, run_spawned
from tests.helpers.layouts import make_batch
from tests.test_parallel_layouts import GLOBAL_BATCH, MODELS, SEQ, VOCAB

pytestmark = [pytest.mark.gpu, requires_cuda]

REL_TOL = 1e-4
LAYOUTS = {
    "tp2": ("llama-gqa", 2, dict(tensor_model_parallel_size=2)),
    "tp2-sp": ("qwen2", 2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "cp2": ("llama-gqa", 2, dict(context_parallel_size=2)),
    "pp2": ("gemma", 2, dict(pipeline_model_parallel_size=2)),
    "dp2": ("llama-gqa", 2, {}),
    "tp2-sp-cp2-gemma": (
        "gemma",
        4,
        dict(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2),
    ),
    "tp2-pp2-tied": ("llama-tied-4l", 4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
}


@pytest.fixture(scope="module")
def batch():
    return make_batch(VOCAB, GLOBAL_BATCH, SEQ)


@pytest.fixture(scope="module")
def references(batch):
    """name -> the single-process reference of MODELS[name], computed once per module."""
    return functools.cache(lambda name: run_spawned(layout_reference, 1, MODELS[name], batch)[0])


@pytest.mark.parametrize(
    "layout", [pytest.param(name, marks=requires_gpus(world)) for name, (_, world, _) in LAYOUTS.items()]
)
def test_layout_matches_one_gpu_under_nccl(layout, batch, references):
    model_name, world, kwargs = LAYOUTS[layout]
    ref = references(model_name)
    scale_w = max(t.abs().max().item() for t in ref["after"].values())
    results = run_spawned(layout_deviation, world, MODELS[model_name], ParallelConfig(**kwargs), batch, ref)
    for rank, dev in enumerate(results):
        assert dev["backend"] == "nccl"
        assert abs(dev["loss"] - ref["loss"]) <= REL_TOL * abs(ref["loss"]), (rank, dev["loss"], ref["loss"])
        assert abs(dev["grad_norm"] - ref["grad_norm"]) <= REL_TOL * ref["grad_norm"], (rank, dev, ref["grad_norm"])
        if "logits_scale" in dev:
            assert dev["logits"] <= REL_TOL * dev["logits_scale"], (rank, dev)
        assert dev["after"] <= REL_TOL * scale_w, (rank, dev)
