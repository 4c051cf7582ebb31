"""Policy and value are clipped by their own gradient norms; the value loss coefficient reaches the trunk.

Why it matters: with one global clip, the value network's large gradient (norm 2-6 on the demo, against
the policy's 0.006-0.03) decided how much the policy's step was shrunk on every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from dqo_megatron.config import LossConfig, ModelConfig, RunConfig, TrainConfig, ValueConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.rl_layouts import make_rl_batch

SEQ, ROWS, VOCAB = 24, 4, 128
MODEL = ModelConfig(
    family="llama",
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    vocab_size=VOCAB,
    seq_length=SEQ,
)
CLIP = 0.5


def _run(mode: str, coef: float) -> RunConfig:
    return RunConfig(
        model=MODEL,
        train=TrainConfig(micro_batch_size=ROWS, global_batch_size=ROWS, seq_length=SEQ),
        algorithm="dqo",
        loss=LossConfig(beta=0.5),
        value=ValueConfig(mode=mode, loss_coef=coef),
    )


def _one_step(run: RunConfig, clips: dict | None):
    """One SGD step from fixed weights; per parameter: the gradient left after clipping and the update."""
    from functools import partial

    from dqo_megatron import parallel
    from dqo_megatron.training.algorithms import rl_forward_step
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.policy_value import build_policy_value_chunks, finalize_policy_value_grads
    from dqo_megatron.training.step import train_step

    parallel.initialize(run.parallel, seed=run.train.seed)
    (chunk,) = build_policy_value_chunks(run, with_value=True, with_reference=False)
    with torch.no_grad():  # a non-zero head, so the value loss has a gradient into the trunk
        chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    ddp = wrap_with_ddp([chunk])
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=0.1, clip_grad=CLIP, optimizer="sgd")
    before = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    batch = make_rl_batch(VOCAB, ROWS, SEQ, with_ref=True, seed=5)
    result = train_step(
        ddp,
        optimizer,
        iter([batch]),
        num_microbatches=1,
        seq_length=SEQ,
        micro_batch_size=ROWS,
        forward_step=partial(rl_forward_step, run),
        metric_key="loss",
        member_clips=clips,
    )
    grads = {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters() if hasattr(p, "main_grad")}
    update = {n: (p.detach() - before[n]) for n, p in chunk.named_parameters()}
    return {"grads": grads, "update": update, "norms": result.grad_norms, "norm": result.grad_norm}


def _member(name: str) -> str:
    return "value" if name.startswith(("value.", "value_head.")) else "policy"


def _norm(tensors: dict, member: str) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for n, t in tensors.items() if _member(n) == member))


def test_a_huge_value_gradient_does_not_shrink_the_policy_step():
    clips = {"policy": CLIP, "value": CLIP}
    (small,) = run_distributed(_one_step, 1, _run("separate", 1.0), clips)
    (huge,) = run_distributed(_one_step, 1, _run("separate", 1000.0), clips)
    assert huge["norms"]["value"] == pytest.approx(1000 * small["norms"]["value"], rel=1e-6)
    assert huge["norms"]["policy"] == pytest.approx(small["norms"]["policy"], rel=1e-9)
    for name, step in small["update"].items():
        if _member(name) == "policy":
            torch.testing.assert_close(huge["update"][name], step, rtol=1e-6, atol=1e-9)
    # each member's gradient after clipping has norm min(its norm, clip); the total is reported too
    for member in ("policy", "value"):
        assert _norm(huge["grads"], member) == pytest.approx(min(huge["norms"][member], CLIP), rel=1e-5)
    assert huge["norm"] == pytest.approx(math.hypot(*huge["norms"].values()), rel=1e-9)
    # the old behaviour, one global clip, lets the value loss shrink the policy's step (the test can fail)
    (shared_clip,) = run_distributed(_one_step, 1, _run("separate", 1000.0), None)
    policy_step = _norm(shared_clip["update"], "policy") / _norm(huge["update"], "policy")
    assert policy_step < 0.05


def test_value_loss_coefficient_reaches_the_shared_trunk_as_asked():
    no_clip = {"policy": 0.0, "value": 0.0}
    runs = {c: run_distributed(_one_step, 1, _run("shared", c), no_clip)[0]["grads"] for c in (0.0, 0.5, 1.0)}
    trunk = [n for n in runs[0.0] if n.startswith("policy.decoder")]
    assert trunk
    moved = max(float((runs[1.0][n] - runs[0.0][n]).abs().max()) for n in trunk)
    assert moved > 1e-4  # the value loss does reach the trunk in shared mode
    scale = max(float(runs[1.0][n].abs().max()) for n in trunk)
    for name in trunk:  # trunk gradient = grad(policy loss) + coef * grad(value loss), up to fp32 rounding
        want = runs[0.0][name] + 0.5 * (runs[1.0][name] - runs[0.0][name])
        torch.testing.assert_close(runs[0.5][name], want, rtol=1e-4, atol=1e-5 * scale)


def _lrs_over_steps(run: RunConfig):
    """The policy's and value's learning rates over 11 steps of a schedule with a 3-step critic warm-up."""
    from dqo_megatron import parallel
    from dqo_megatron.training.megatron_setup import build_optimizer, build_scheduler, wrap_with_ddp
    from dqo_megatron.training.metrics_logger import learning_rates
    from dqo_megatron.training.policy_value import build_policy_value_chunks

    parallel.initialize(run.parallel, seed=run.train.seed)
    (chunk,) = build_policy_value_chunks(run, with_value=True, with_reference=False)
    optimizer = build_optimizer(wrap_with_ddp([chunk]), lr=1e-3, value_lr=1e-2)
    scheduler = build_scheduler(
        optimizer, lr=1e-3, min_lr=0.0, warmup_steps=2, decay_steps=10, decay_style="linear", policy_delay=3
    )
    lrs = []
    for _ in range(11):
        lrs.append(learning_rates(optimizer))
        scheduler.step(increment=1)
    return lrs


def test_critic_warmup_delays_the_policy_schedule():
    (lrs,) = run_distributed(_lrs_over_steps, 1, _run("separate", 1.0))
    policy = [lr["policy"] for lr in lrs]
    value = [lr["value"] for lr in lrs]
    assert policy[:4] == [0.0, 0.0, 0.0, 0.0]
    # then the policy's own warmup (2 steps) and linear decay over the remaining 10 - 3 = 7 steps
    want = [1e-3 * 1 / 2, 1e-3, 1e-3 * (1 - 1 / 5), 1e-3 * (1 - 2 / 5), 1e-3 * (1 - 3 / 5)]
    assert policy[4:9] == pytest.approx(want, rel=1e-9)
    assert value[1] == pytest.approx(1e-2 / 2) and value[2] == pytest.approx(1e-2)  # the value is not delayed


def _first_policy_step_after_warmup(run: RunConfig, correct: bool):
    """3 warm-up steps (policy loss weighted 0, as the trainer does), then one policy step with Adam."""
    from functools import partial

    from dqo_megatron import parallel
    from dqo_megatron.training.algorithms import rl_forward_step
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, build_scheduler, wrap_with_ddp
    from dqo_megatron.training.policy_value import build_policy_value_chunks, finalize_policy_value_grads
    from dqo_megatron.training.step import train_step

    parallel.initialize(run.parallel, seed=run.train.seed)
    (chunk,) = build_policy_value_chunks(run, with_value=True, with_reference=False)
    ddp = wrap_with_ddp([chunk])
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=1e-3, value_lr=1e-2)
    scheduler = build_scheduler(
        optimizer,
        lr=1e-3,
        min_lr=0.0,
        warmup_steps=0,
        decay_steps=10,
        decay_style="constant",
        policy_delay=3,
        adam_betas=(0.9, 0.999) if correct else None,
    )
    batch = make_rl_batch(VOCAB, ROWS, SEQ, with_ref=True, seed=5)
    clips = {"policy": 1.0, "value": 1.0}
    policy = {n: p for n, p in chunk.named_parameters() if n.startswith("policy.decoder")}
    start = {n: p.detach().clone() for n, p in policy.items()}
    for k in range(4):
        if k == 3:
            before = {n: p.detach().clone() for n, p in policy.items()}
        forward = partial(rl_forward_step, run, policy_weight=0.0 if k < 3 else 1.0)
        result = train_step(
            ddp,
            optimizer,
            iter([batch]),
            num_microbatches=1,
            seq_length=SEQ,
            micro_batch_size=ROWS,
            forward_step=forward,
            metric_key="loss",
            member_clips=clips,
        )
        if k < 3:
            assert result.grad_norms["policy"] == 0.0 and result.grad_norms["value"] > 0.0
        scheduler.step(increment=1)
    still = max(float((before[n] - start[n]).abs().max()) for n in policy)
    first = max(float((p.detach() - before[n]).abs().max()) for n, p in policy.items())
    return {"moved_during_warmup": still, "first_step": first}


def test_the_first_policy_step_after_the_warmup_is_a_fresh_adam_step():
    (out,) = run_distributed(_first_policy_step_after_warmup, 1, _run("separate", 1.0), True)
    assert out["moved_during_warmup"] == 0.0
    # a fresh Adam's first step moves each element with a clear gradient by exactly lr (|m_hat / sqrt(v_hat)| = 1)
    assert out["first_step"] == pytest.approx(1e-3, rel=1e-2)
    # without the correction Adam bias-corrects with t = 4 for one real gradient: 0.58 x lr (the test can fail)
    (raw,) = run_distributed(_first_policy_step_after_warmup, 1, _run("separate", 1.0), False)
    assert raw["first_step"] == pytest.approx(0.581e-3, rel=2e-2)
