"""DQO losses, gradients and metrics against the brute-force reference; the doc's special cases."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.losses import dqo_losses, dro_losses, lambda_returns, truncated_importance_weights

from . import brute_force as bf
from .brute_force import random_batch

BETA = 0.4
ADDITIVE_METRICS = (
    "policy_loss",
    "value_loss",
    "value_mean",
    "td_error_abs_mean",
    "return_mean",
    "return_sq_mean",
    "advantage_mean",
    "advantage_sq_mean",
    "is_weight_mean",
    "is_truncated_frac",
    "kl_ref",
    "entropy_proxy",
)


def _leaves(batch):
    return batch.logprobs.clone().requires_grad_(), batch.values.clone().requires_grad_()


def _grads(loss, leaves):
    grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def _run(batch, logprobs, values, **kwargs):
    return dqo_losses(
        logprobs,
        batch.ref_logprobs,
        batch.behavior_logprobs,
        values,
        batch.rewards,
        batch.mask,
        document_ids=batch.document_ids,
        **kwargs,
    )


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
@pytest.mark.parametrize("is_level", ["trajectory", "prefix", "off"])
@pytest.mark.parametrize("self_normalize", [False, True])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_losses_gradients_and_metrics_match_brute_force(layout, is_level, self_normalize, reduction, lam):
    _check_against_brute_force(layout, is_level, self_normalize, reduction, lam, "both")


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
@pytest.mark.parametrize("is_level", ["trajectory", "prefix"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("is_apply_to", ["policy", "value"])
def test_importance_weights_on_one_loss_match_brute_force(layout, is_level, reduction, is_apply_to):
    _check_against_brute_force(layout, is_level, False, reduction, 0.7, is_apply_to)


def _check_against_brute_force(layout, is_level, self_normalize, reduction, lam, is_apply_to):
    batch = random_batch(layout, seed=31)
    settings = dict(beta=BETA, lam=lam, is_level=is_level, is_clip=1.2, reduction=reduction, is_apply_to=is_apply_to)
    logprobs, values = _leaves(batch)
    out = _run(batch, logprobs, values, is_self_normalize=self_normalize, **settings)

    ref_logprobs, ref_values = _leaves(batch)
    expected = bf.dqo(
        batch,
        ref_logprobs,
        ref_values,
        self_normalize=self_normalize,
        behavior_logprobs=batch.behavior_logprobs,
        **settings,
    )

    assert out.policy_loss.dtype == torch.float64
    torch.testing.assert_close(out.policy_loss, expected["policy_loss"], rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(out.value_loss, expected["value_loss"], rtol=1e-11, atol=1e-13)
    for ours, theirs in ((out.policy_loss, expected["policy_loss"]), (out.value_loss, expected["value_loss"])):
        for got, want in zip(_grads(ours, [logprobs, values]), _grads(theirs, [ref_logprobs, ref_values])):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    for name, want in expected["metrics"].items():
        numerator, denominator = out.metrics[name]
        assert (numerator / denominator).item() == pytest.approx(want, rel=1e-10, abs=1e-12), name
    for name in ("policy_loss", "value_loss"):
        numerator, denominator = out.metrics[name]
        torch.testing.assert_close(numerator / denominator, getattr(out, name).detach())


def test_policy_gradient_identity_at_lambda_one():
    """lam = 1: d L_pi / d logp_h = beta * w_h * (V_h - G_h) per token (token-sum form; the sequence
    reduction divides each token by its document's length)."""
    batch = random_batch("packed", seed=32)
    for reduction in ("token", "sequence"):
        logprobs, values = _leaves(batch)
        out = _run(batch, logprobs, values, beta=BETA, lam=1.0, is_level="trajectory", reduction=reduction)
        (grad,) = torch.autograd.grad(out.policy_loss_sum, logprobs)
        G = lambda_returns(
            batch.rewards,
            batch.logprobs,
            batch.ref_logprobs,
            batch.values,
            batch.mask,
            beta=BETA,
            lam=1.0,
            document_ids=batch.document_ids,
        )
        w = truncated_importance_weights(
            batch.logprobs, batch.behavior_logprobs, batch.mask, document_ids=batch.document_ids
        ).weights
        expected = BETA * w * (batch.values - G) * batch.mask
        if reduction == "sequence":
            for b, positions in bf.documents(batch.mask, batch.document_ids):
                expected[b, positions] /= len(positions)
        torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-13)


def _single_token_batch():
    """Every document has H = 1 response token, packed and padded."""
    rows = [
        [("prompt", 3, 0), ("response", 1, 0), ("pad", 2)],
        [("prompt", 1, 4), ("response", 1, 4), ("prompt", 2, 5), ("response", 1, 5), ("response", 1, 6)],
        [("pad", 4), ("prompt", 1, 2), ("response", 1, 2)],
    ]
    mask, docs = bf.build_mask(rows, packed=True)
    g = torch.Generator().manual_seed(33)
    logprobs = -2 * torch.rand(mask.shape, generator=g, dtype=torch.float64)
    return bf.Batch(
        mask,
        docs,
        logprobs,
        logprobs + 0.5 * torch.randn(mask.shape, generator=g, dtype=torch.float64),
        None,
        torch.randn(mask.shape, generator=g, dtype=torch.float64),
        (torch.rand(mask.shape, generator=g) < 0.5).double() * mask,
    )


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_single_token_responses_without_is_reduce_to_dro(lam):
    batch = _single_token_batch()
    logprobs, values = _leaves(batch)
    out = dqo_losses(
        logprobs,
        batch.ref_logprobs,
        None,
        values,
        batch.rewards,
        batch.mask,
        beta=BETA,
        lam=lam,
        is_level="off",
        document_ids=batch.document_ids,
    )
    dro_logprobs, dro_values = _leaves(batch)
    dro = dro_losses(
        dro_logprobs,
        batch.ref_logprobs,
        dro_values,
        batch.rewards,
        batch.mask,
        beta=BETA,
        document_ids=batch.document_ids,
    )
    assert out.count.item() == dro.count.item() == 5
    for name in ("policy_loss", "value_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(dro, name), rtol=1e-13, atol=1e-14)
        for got, want in zip(
            _grads(getattr(out, name), [logprobs, values]), _grads(getattr(dro, name), [dro_logprobs, dro_values])
        ):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def test_gradients_flow_only_where_the_doc_says():
    batch = random_batch("packed", seed=34)
    frozen = {
        name: getattr(batch, name).clone().requires_grad_() for name in ("ref_logprobs", "behavior_logprobs", "rewards")
    }
    for part, trained, untouched in (("policy_loss", "logprobs", "values"), ("value_loss", "values", "logprobs")):
        leaves = dict(zip(("logprobs", "values"), _leaves(batch)))
        for x in frozen.values():
            x.grad = None
        out = dqo_losses(
            leaves["logprobs"],
            frozen["ref_logprobs"],
            frozen["behavior_logprobs"],
            leaves["values"],
            frozen["rewards"],
            batch.mask,
            beta=BETA,
            lam=0.5,
            document_ids=batch.document_ids,
        )
        getattr(out, part).backward()
        assert leaves[trained].grad is not None and leaves[trained].grad.abs().sum() > 0
        assert leaves[untouched].grad is None, f"{part} leaked a gradient into {untouched}"
        for name, x in frozen.items():
            assert x.grad is None, f"{part} leaked a gradient into {name}"


@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("layout", ["right", "packed"])
def test_micro_batch_sums_equal_the_whole_batch(reduction, layout):
    """Megatron's contract: sum of micro-batch loss sums / total count = the whole batch's mean, for the
    losses, their gradients and the metrics."""
    batch = random_batch(layout, seed=35)
    settings = dict(beta=BETA, lam=0.8, is_level="trajectory", reduction=reduction)
    logprobs, values = _leaves(batch)
    whole = _run(batch, logprobs, values, **settings)
    whole_grads = _grads(whole.loss, [logprobs, values])

    logprobs, values = _leaves(batch)
    total_sum, total_count, metric_sums = 0.0, 0, {}
    for row in range(batch.mask.shape[0]):
        part = slice(row, row + 1)
        docs = None if batch.document_ids is None else batch.document_ids[part]
        out = dqo_losses(
            logprobs[part],
            batch.ref_logprobs[part],
            batch.behavior_logprobs[part],
            values[part],
            batch.rewards[part],
            batch.mask[part],
            document_ids=docs,
            **settings,
        )
        total_sum = total_sum + out.loss_sum
        total_count += int(out.count)
        for name, value in out.metrics.items():
            metric_sums[name] = metric_sums.get(name, 0) + value
    assert total_count == int(whole.count)
    torch.testing.assert_close(total_sum / total_count, whole.loss, rtol=1e-12, atol=1e-14)
    for got, want in zip(_grads(total_sum / total_count, [logprobs, values]), whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for name in ADDITIVE_METRICS:
        torch.testing.assert_close(metric_sums[name], whole.metrics[name], rtol=1e-12, atol=1e-12)


def test_megatron_loss_func_output():
    batch = random_batch("right", seed=36)
    out = _run(batch, *_leaves(batch), beta=BETA, lam=1.0)
    loss_sum, count, metrics = out.loss_func_output()
    assert count.dtype == torch.int32 and count.item() == int(batch.mask.sum())
    torch.testing.assert_close(loss_sum, out.policy_loss_sum + out.value_loss_sum)
    assert all(m.shape == (2,) and not m.requires_grad for m in metrics.values())
    assert set(metrics) == set(ADDITIVE_METRICS) | {"is_weight_max"}


def test_behavior_none_means_reference():
    batch = random_batch("gaps", seed=37)
    args = (batch.values, batch.rewards, batch.mask)
    kwargs = dict(beta=BETA, lam=0.9, is_level="prefix", document_ids=batch.document_ids)
    implicit = dqo_losses(batch.logprobs, batch.ref_logprobs, None, *args, **kwargs)
    explicit = dqo_losses(batch.logprobs, batch.ref_logprobs, batch.ref_logprobs, *args, **kwargs)
    different = dqo_losses(batch.logprobs, batch.ref_logprobs, batch.behavior_logprobs, *args, **kwargs)
    torch.testing.assert_close(implicit.loss_sum, explicit.loss_sum, rtol=0, atol=0)
    assert not torch.allclose(implicit.loss_sum, different.loss_sum)


def test_low_precision_inputs_are_computed_in_float32():
    batch = random_batch("left", seed=38)
    logprobs = batch.logprobs.bfloat16().requires_grad_()
    values = batch.values.bfloat16().requires_grad_()
    out = dqo_losses(
        logprobs,
        batch.ref_logprobs.bfloat16(),
        None,
        values,
        batch.rewards.bfloat16(),
        batch.mask.bool(),
        beta=BETA,
        lam=0.6,
    )
    assert out.policy_loss.dtype == out.value_loss.dtype == torch.float32
    out.loss.backward()
    assert logprobs.grad.dtype == torch.bfloat16 and values.grad.dtype == torch.bfloat16
    exact = dqo_losses(
        *(x.bfloat16().double() for x in (batch.logprobs, batch.ref_logprobs)),
        None,
        batch.values.bfloat16().double(),
        batch.rewards.bfloat16().double(),
        batch.mask,
        beta=BETA,
        lam=0.6,
    )
    torch.testing.assert_close(out.loss.double(), exact.loss, rtol=1e-5, atol=1e-6)


def test_padding_contents_never_reach_losses_or_gradients():
    batch = random_batch("packed", seed=39)
    pad = batch.mask == 0
    poison = torch.where(pad, float("nan"), 0.0).double()
    logprobs = (batch.logprobs + torch.where(pad, float("-inf"), 0.0).double()).requires_grad_()
    values = (batch.values + poison).requires_grad_()
    out = dqo_losses(
        logprobs,
        batch.ref_logprobs + poison,
        batch.behavior_logprobs + poison,
        values,
        batch.rewards + poison,
        batch.mask,
        beta=BETA,
        lam=0.5,
        document_ids=batch.document_ids,
    )
    clean = _run(batch, *_leaves(batch), beta=BETA, lam=0.5)
    torch.testing.assert_close(out.loss_sum, clean.loss_sum, rtol=0, atol=0)
    out.loss_sum.backward()
    assert (logprobs.grad[pad] == 0).all() and (values.grad[pad] == 0).all()
    assert all(torch.isfinite(m).all() for m in out.metrics.values())


def test_batch_without_response_tokens():
    batch = random_batch("right", seed=40)
    logprobs, values = _leaves(batch)
    out = dqo_losses(
        logprobs,
        batch.ref_logprobs,
        None,
        values,
        batch.rewards,
        torch.zeros_like(batch.mask),
        beta=BETA,
        lam=0.5,
        reduction="sequence",
        is_self_normalize=True,
    )
    assert out.count.item() == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert (logprobs.grad == 0).all()
    assert all(torch.isfinite(m).all() for m in out.metrics.values())
