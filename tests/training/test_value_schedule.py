"""Policy and value network follow their own learning-rate schedules (peak, final, warmup, decay)."""

from __future__ import annotations

import math

from dqo_megatron.config import ModelConfig, RunConfig, TrainConfig, ValueConfig
from tests.helpers.distributed import run_distributed

STEPS = 12


def _expected(step: int, peak: float, final: float, warmup: int, style: str) -> float:
    """Independent formula: linear warmup from 0, then constant / linear / cosine decay to `final`."""
    if warmup and step <= warmup:
        return peak * step / warmup
    if style == "constant":
        return peak
    ratio = (step - warmup) / (STEPS - warmup)
    coeff = 1 - ratio if style == "linear" else 0.5 * (1 + math.cos(math.pi * ratio))
    return final + coeff * (peak - final)


def _lrs_over_steps(run: RunConfig):
    from dqo_megatron import parallel
    from dqo_megatron.training.megatron_setup import build_optimizer, build_scheduler, wrap_with_ddp
    from dqo_megatron.training.metrics_logger import learning_rates
    from dqo_megatron.training.policy_value import build_policy_value_chunks

    parallel.initialize(run.parallel, seed=run.train.seed)
    chunks = build_policy_value_chunks(run, with_value=True, with_reference=False)
    ddp = wrap_with_ddp(chunks)
    t, v = run.train, run.value
    optimizer = build_optimizer(ddp, lr=t.lr, min_lr=t.min_lr, value_lr=v.lr, value_min_lr=v.min_lr)
    scheduler = build_scheduler(
        optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.lr_warmup_steps,
        decay_steps=t.train_steps,
        decay_style=t.lr_decay_style,
        value_warmup_steps=v.lr_warmup_steps,
        value_decay_style=v.lr_decay_style,
    )
    seen = []
    for _ in range(STEPS + 1):
        seen.append(learning_rates(optimizer))
        scheduler.step(increment=1)
    return seen


def test_value_network_has_its_own_schedule():
    model = ModelConfig(
        family="llama",
        num_layers=1,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        vocab_size=64,
        seq_length=16,
    )
    train = TrainConfig(
        seq_length=16, lr=1e-3, min_lr=1e-4, lr_warmup_steps=2, lr_decay_style="cosine", train_steps=STEPS
    )
    value = ValueConfig(lr=5e-3, min_lr=0.0, lr_warmup_steps=4, lr_decay_style="linear")
    (seen,) = run_distributed(_lrs_over_steps, 1, RunConfig(model=model, train=train, value=value))
    assert set(seen[0]) == {"policy", "value"}
    for step, lrs in enumerate(seen):
        assert math.isclose(lrs["policy"], _expected(step, 1e-3, 1e-4, 2, "cosine"), rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(lrs["value"], _expected(step, 5e-3, 0.0, 4, "linear"), rel_tol=1e-9, abs_tol=1e-12)
    # unset value fields follow the policy's shape with the value's own peak
    value = ValueConfig(lr=5e-3)
    (seen,) = run_distributed(_lrs_over_steps, 1, RunConfig(model=model, train=train, value=value))
    for step, lrs in enumerate(seen):
        assert math.isclose(lrs["value"], _expected(step, 5e-3, 1e-4, 2, "cosine"), rel_tol=1e-9, abs_tol=1e-12)
