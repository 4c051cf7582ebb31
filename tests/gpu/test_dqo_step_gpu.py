"""DQO optimizer steps on one GPU through the trainer's pieces (PolicyValueModel with a separate value
network, Megatron DDP and optimizer, `train_step` + `rl_forward_step`), in bf16 (the GPU default) and
fp32: per-token outputs leave the model in fp32, the optimizer keeps fp32 master weights of bf16
parameters, every step is applied with finite loss and gradient norm, and repeating the same batch
lowers the loss. Megatron's distributed optimizer (which cannot run on CPU) takes the same steps as
the ordinary one."""

from __future__ import annotations

import math

import pytest

from dqo_megatron.config import ModelConfig
from tests.gpu.bodies import dqo_steps
from tests.gpu.support import requires_cuda, requires_gpus, run_spawned

pytestmark = [pytest.mark.gpu, requires_cuda]

MODEL = ModelConfig(
    family="qwen2",
    num_layers=2,
    hidden_size=128,
    ffn_hidden_size=256,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=512,
    seq_length=128,
)


@pytest.mark.parametrize(("dtype", "value_mode"), [("bf16", "separate"), ("fp32", "separate"), ("bf16", "shared")])
def test_dqo_steps_on_gpu(dtype, value_mode):
    (out,) = run_spawned(dqo_steps, 1, MODEL, dtype, 6, 4, 128, value_mode=value_mode)
    assert out["device"].startswith("cuda") and out["nccl"] == "nccl"
    assert out["param_dtypes"] == (["torch.bfloat16"] if dtype == "bf16" else ["torch.float32"])
    assert out["optimizer_param_dtypes"] == ["torch.float32"]  # fp32 master weights under bf16
    assert str(out["output_dtype"]) == "torch.float32" and out["finite_output"]
    steps = out["steps"]
    assert all(s["ok"] and math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps), steps
    assert steps[-1]["loss"] < steps[0]["loss"], steps


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=requires_gpus(2))], ids=["dp1", "dp2"])
def test_distributed_optimizer_takes_the_same_steps(world):
    """bf16 with fp32 master weights, sharded over data-parallel ranks (every rank sees the same batch,
    so DP=2 must follow DP=1's trajectory) vs the ordinary optimizer on one GPU."""
    (plain,) = run_spawned(dqo_steps, 1, MODEL, "bf16", 4, 4, 128)
    for out in run_spawned(dqo_steps, world, MODEL, "bf16", 4, 4, 128, distributed_optimizer=True):
        assert out["optimizer_classes"] == ["DistributedOptimizer"], out["optimizer_classes"]
        assert out["optimizer_param_dtypes"] == ["torch.float32"]
        for got, want in zip(out["steps"], plain["steps"]):
            assert got["ok"] and got["loss"] == pytest.approx(want["loss"], rel=2e-3), (out["steps"], plain["steps"])
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=2e-2)
