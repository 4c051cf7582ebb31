"""Every parallel layout reproduces the single-process model: logits, loss, grads, weights after a step.

Each layout starts from the reference's exact weights (sharded by `dqo_megatron.models.weights`),
runs Megatron DDP + Megatron's optimizer + `get_forward_backward_func` for one step on the same
global batch, and each rank compares its own shards with the reference.

Tolerance (fp32): layouts change the order of floating-point sums (TP splits the hidden/FFN
reductions and all-reduces partial products; CP and DP sum token contributions in another order;
finalize divides by the global token count after the all-reduce). Each reordered sum of n terms
moves the result by at most ~n * eps_fp32 * |terms|; with n <= 256 and eps = 1.2e-7 that is
~3e-5 relative in the worst case and ~sqrt(n) * eps ~ 2e-6 typically (measured: <= 3e-7). We allow
2e-5 relative to the tensor scale, far below any real bug (a wrong
shard, a missing all-reduce or a doubled gradient shows up at the 1e-1..1e0 level).
SGD (not Adam) is used so that weights after the step are linear in the gradient: Adam's first step
is ~lr*sign(g) and would amplify 1e-9 noise on near-zero gradients into lr-sized differences.
"""

from __future__ import annotations

import functools

import pytest

from dqo_megatron.config import ModelConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.layouts import LR, layout_step, make_batch, reference_step

REL_TOL = 2e-5
SEQ, GLOBAL_BATCH, VOCAB = 32, 4, 256

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2)
TINY.update(vocab_size=VOCAB, seq_length=SEQ)

MODELS = {
    "llama-gqa": ModelConfig(family="llama", **TINY),
    "llama-tied-4l": ModelConfig(family="llama", **{**TINY, "num_layers": 4}, tie_embeddings=True),
    "qwen2": ModelConfig(family="qwen2", **TINY),
    "gemma": ModelConfig(family="gemma", **TINY, kv_channels=24),
}

# name: (model, world size, layout)
LAYOUTS = {
    "tp2": ("llama-gqa", 2, dict(tensor_model_parallel_size=2)),
    "tp2-sp": ("qwen2", 2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "pp2": ("gemma", 2, dict(pipeline_model_parallel_size=2)),
    "cp2": ("llama-gqa", 2, dict(context_parallel_size=2)),
    "dp2": ("llama-gqa", 2, {}),
    "pp2-vpp2-tied": ("llama-tied-4l", 2, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
    "tp2-pp2-tied": ("llama-tied-4l", 4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "tp2-sp-cp2-gemma": (
        "gemma",
        4,
        dict(tensor_model_parallel_size=2, sequence_parallel=True, context_parallel_size=2),
    ),
}


@pytest.fixture(scope="module")
def batch():
    return make_batch(VOCAB, GLOBAL_BATCH, SEQ)


@pytest.fixture(scope="module")
def references(batch):
    """name -> the single-process reference of MODELS[name], computed once per module."""
    return functools.cache(lambda name: run_distributed(reference_step, 1, MODELS[name], batch)[0])


def _scale(tensors):
    return max(t.abs().max().item() for t in tensors.values())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, batch, references):
    model_name, world, parallel_kwargs = LAYOUTS[layout]
    ref = references(model_name)
    results = run_distributed(layout_step, world, MODELS[model_name], ParallelConfig(**parallel_kwargs), batch, ref)
    grad_scale = _scale(ref["grads"])
    for rank, dev in enumerate(results):
        assert dev["loss"] == pytest.approx(ref["loss"], rel=REL_TOL), f"rank {rank} loss"
        assert dev["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL), f"rank {rank} grad norm"
        assert dev["grads"] <= REL_TOL * grad_scale, f"rank {rank}: grads differ by {dev['grads']:.3g}"
        # weights after the step differ by lr * (grad difference)
        assert dev["after"] <= REL_TOL * LR * grad_scale + 1e-7, f"rank {rank}: weights differ by {dev['after']:.3g}"
        if "logits_scale" in dev:
            assert dev["logits"] <= REL_TOL * dev["logits_scale"], f"rank {rank}: logits differ by {dev['logits']:.3g}"
    assert any("logits_scale" in dev for dev in results), "no rank compared logits"
    # the step actually changed something (a no-op optimizer would pass the checks above)
    moved = max((ref["after"][k] - ref["initial"][k]).abs().max().item() for k in ref["initial"])
    assert moved > 1e-4


def test_four_microbatches_of_one_equal_one_of_four(batch):
    (one_by_four,) = run_distributed(reference_step, 1, MODELS["llama-gqa"], batch, 1)
    (four_by_one,) = run_distributed(reference_step, 1, MODELS["llama-gqa"], batch, 4)
    assert one_by_four["loss"] == pytest.approx(four_by_one["loss"], rel=1e-6)
    scale = _scale(four_by_one["grads"])
    for name, grad in four_by_one["grads"].items():
        assert (grad - one_by_four["grads"][name]).abs().max().item() <= 1e-5 * scale, name
