"""lambda-returns against explicit n-step sums, on every layout, and the doc's special cases."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.losses import lambda_returns

from . import brute_force as bf
from .brute_force import random_batch

BETA = 0.3


def _returns(batch, lam, **overrides):
    args = dict(
        rewards=batch.rewards,
        logprobs=batch.logprobs,
        ref_logprobs=batch.ref_logprobs,
        values=batch.values,
        response_mask=batch.mask,
    )
    args.update(overrides)
    return lambda_returns(**args, beta=BETA, lam=lam, document_ids=batch.document_ids)


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
@pytest.mark.parametrize("lam", [0.0, 0.35, 0.9, 1.0])
def test_matches_n_step_definition(layout, lam):
    batch = random_batch(layout, seed=11)
    expected = bf.lambda_returns(
        batch.rewards, batch.logprobs, batch.ref_logprobs, batch.values, batch.mask, batch.document_ids, BETA, lam
    )
    got = _returns(batch, lam)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_monte_carlo_at_lambda_one():
    """lam = 1: G_1 = R - beta * sum_h rho_h for an outcome reward R (values play no role)."""
    batch = random_batch("packed", seed=3, process_rewards=False)
    got = _returns(batch, 1.0)
    other_values = _returns(batch, 1.0, values=torch.randn_like(batch.values))
    torch.testing.assert_close(got, other_values, rtol=0, atol=0)
    for b, positions in bf.documents(batch.mask, batch.document_ids):
        outcome = float(batch.rewards[b, positions].sum())
        kl = float((batch.logprobs[b, positions] - batch.ref_logprobs[b, positions]).sum())
        assert got[b, positions[0]].item() == pytest.approx(outcome - BETA * kl, abs=1e-12)


def test_one_step_target_at_lambda_zero():
    """lam = 0: G_h = r~_h + V_(h+1), with V after a document's last token = 0."""
    batch = random_batch("gaps", seed=4)
    got = _returns(batch, 0.0)
    for b, positions in bf.documents(batch.mask, batch.document_ids):
        for k, p in enumerate(positions):
            shaped = batch.rewards[b, p] - BETA * (batch.logprobs[b, p] - batch.ref_logprobs[b, p])
            next_value = batch.values[b, positions[k + 1]] if k + 1 < len(positions) else 0.0
            assert got[b, p].item() == pytest.approx(float(shaped + next_value), abs=1e-12)


def test_left_and_right_padding_agree():
    right = random_batch("right", seed=5)
    mask = right.mask
    # Move each row's real tokens (everything up to its last response token) to the right end.
    shifts = [int(mask.shape[1] - 1 - mask[b].nonzero().max()) for b in range(mask.shape[0])]

    def roll(x):
        return torch.stack([torch.roll(x[b], shifts[b]) for b in range(x.shape[0])])

    left = lambda_returns(
        roll(right.rewards),
        roll(right.logprobs),
        roll(right.ref_logprobs),
        roll(right.values),
        roll(mask),
        beta=BETA,
        lam=0.7,
    )
    torch.testing.assert_close(left, roll(_returns(right, 0.7)), rtol=0, atol=1e-14)


def test_packed_row_equals_separate_rows():
    batch = random_batch("packed", seed=6)
    packed = _returns(batch, 0.6)
    for b, positions in bf.documents(batch.mask, batch.document_ids):
        only = torch.zeros_like(batch.mask)
        only[b, positions] = 1
        alone = lambda_returns(
            batch.rewards, batch.logprobs, batch.ref_logprobs, batch.values, only, beta=BETA, lam=0.6
        )
        torch.testing.assert_close(packed[b, positions], alone[b, positions], rtol=0, atol=1e-14)


def test_long_rows_match_the_plain_backward_loop():
    """Many doubling steps of the scan (seq not a power of two) against the textbook recursion."""
    g = torch.Generator().manual_seed(0)
    batch, seq = 3, 1500
    mask = torch.zeros(batch, seq, dtype=torch.float64)
    mask[0, 10:1400] = 1
    mask[1, 700:] = 1
    mask[2, 1:] = 1
    rewards, logp, ref, values = (torch.randn(batch, seq, generator=g, dtype=torch.float64) for _ in range(4))
    got = lambda_returns(rewards, logp, ref, values, mask, beta=0.05, lam=0.97)
    expected = torch.zeros_like(got)
    for b in range(batch):
        following_return = following_value = 0.0
        for t in reversed(range(seq)):
            if mask[b, t]:
                shaped = float(rewards[b, t] - 0.05 * (logp[b, t] - ref[b, t]))
                expected[b, t] = shaped + 0.03 * following_value + 0.97 * following_return
                following_return, following_value = float(expected[b, t]), float(values[b, t])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_padding_contents_are_ignored_and_no_gradient_flows():
    batch = random_batch("left", seed=8)
    junk = torch.where(batch.mask.bool(), 0.0, float("nan")).to(torch.float64)
    logprobs = (batch.logprobs + junk).requires_grad_()
    values = (batch.values + torch.where(batch.mask.bool(), 0.0, float("inf"))).requires_grad_()
    got = _returns(batch, 0.5, logprobs=logprobs, values=values, rewards=batch.rewards + junk)
    assert not got.requires_grad
    torch.testing.assert_close(got, _returns(batch, 0.5), rtol=0, atol=0)
    assert (got[batch.mask == 0] == 0).all()


def test_bfloat16_inputs_give_float32_returns():
    batch = random_batch("right", seed=9)
    got = lambda_returns(
        batch.rewards.bfloat16(),
        batch.logprobs.bfloat16(),
        batch.ref_logprobs.bfloat16(),
        batch.values.bfloat16(),
        batch.mask.bool(),
        beta=BETA,
        lam=0.8,
    )
    assert got.dtype == torch.float32
    expected = lambda_returns(
        batch.rewards.bfloat16().double(),
        batch.logprobs.bfloat16().double(),
        batch.ref_logprobs.bfloat16().double(),
        batch.values.bfloat16().double(),
        batch.mask,
        beta=BETA,
        lam=0.8,
    )
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
