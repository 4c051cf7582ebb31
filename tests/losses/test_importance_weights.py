"""Truncated importance weights against explicit per-document sums of log-ratios."""

from __future__ import annotations

import math

import pytest
import torch

from dqo_megatron.losses import truncated_importance_weights

from . import brute_force as bf
from .brute_force import random_batch


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
@pytest.mark.parametrize("level", ["trajectory", "prefix", "off"])
@pytest.mark.parametrize("self_normalize,reduction", [(False, "token"), (True, "token"), (True, "sequence")])
def test_matches_explicit_sums(layout, level, self_normalize, reduction):
    batch = random_batch(layout, seed=21)
    clip = 1.1  # low enough that some weights are truncated
    got = truncated_importance_weights(
        batch.logprobs,
        batch.behavior_logprobs,
        batch.mask,
        level=level,
        clip=clip,
        self_normalize=self_normalize,
        reduction=reduction,
        document_ids=batch.document_ids,
    )
    expected = bf.importance_weights(
        batch.logprobs, batch.behavior_logprobs, batch.mask, batch.document_ids, level, clip, self_normalize, reduction
    )
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-12, atol=1e-12)
    assert got.mean.item() == pytest.approx(expected.mean, abs=1e-12)
    assert got.max.item() == pytest.approx(expected.max, abs=1e-12)
    assert got.truncated_fraction.item() == pytest.approx(expected.truncated_fraction, abs=1e-12)
    if level != "off":
        assert 0 < expected.truncated_fraction < 1, "the test batch should truncate some weights, not all"


def test_self_normalized_weights_average_to_one():
    batch = random_batch("packed", seed=22)
    for reduction in ("token", "sequence"):
        w = truncated_importance_weights(
            batch.logprobs,
            batch.behavior_logprobs,
            batch.mask,
            level="prefix",
            self_normalize=True,
            reduction=reduction,
            document_ids=batch.document_ids,
        ).weights
        docs = bf.documents(batch.mask, batch.document_ids)
        if reduction == "token":
            mean = w.sum() / batch.mask.sum()
        else:
            mean = sum(w[b, positions].mean() for b, positions in docs) / len(docs)
        assert mean.item() == pytest.approx(1.0, abs=1e-12)


def test_huge_log_ratios_do_not_overflow():
    """Sums of log-ratios far beyond exp's range: the weight is exactly the clip, never inf or NaN."""
    mask = torch.ones(2, 400)
    logprobs = torch.zeros(2, 400)
    behavior = torch.full((2, 400), -5.0)
    behavior[1] = 5.0  # tiny weights underflow to 0, which is correct and finite
    for level in ("trajectory", "prefix"):
        out = truncated_importance_weights(logprobs, behavior, mask, level=level, clip=2.0)
        assert torch.isfinite(out.weights).all()
        assert (out.weights[0] == 2.0).all() if level == "trajectory" else (out.weights[0, 1:] == 2.0).all()
        assert out.weights[1].max() <= math.exp(-5.0) + 1e-7


def test_no_gradient_and_float32_from_bfloat16():
    batch = random_batch("right", seed=23)
    logprobs = batch.logprobs.bfloat16().requires_grad_()
    out = truncated_importance_weights(logprobs, batch.behavior_logprobs.bfloat16(), batch.mask)
    assert out.weights.dtype == torch.float32
    assert not out.weights.requires_grad


def test_same_policy_gives_unit_weights():
    batch = random_batch("gaps", seed=24)
    out = truncated_importance_weights(
        batch.logprobs, batch.logprobs.clone(), batch.mask, level="prefix", document_ids=batch.document_ids
    )
    torch.testing.assert_close(out.weights, batch.mask)
    assert out.truncated_fraction.item() == 0.0
