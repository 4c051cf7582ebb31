"""DRO, DPO, KTO, SFT and rejection sampling against brute-force references, gradients included."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.losses import (
    document_ids_from_cu_seqlens,
    dpo_loss,
    dro_losses,
    kto_loss,
    preference_pairs,
    rejection_sampling_loss,
    sequence_logprobs,
    sft_loss,
)

from . import brute_force as bf
from .brute_force import random_batch

BETA = 0.25


def _grad(loss, leaf):
    (grad,) = torch.autograd.grad(loss, [leaf], retain_graph=True, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else grad


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
def test_dro_matches_brute_force(layout):
    batch = random_batch(layout, seed=41)
    logprobs, values = batch.logprobs.clone().requires_grad_(), batch.values.clone().requires_grad_()
    out = dro_losses(
        logprobs, batch.ref_logprobs, values, batch.rewards, batch.mask, beta=BETA, document_ids=batch.document_ids
    )
    ref_logprobs, ref_values = batch.logprobs.clone().requires_grad_(), batch.values.clone().requires_grad_()
    expected = bf.dro(batch, ref_logprobs, ref_values, beta=BETA)
    assert out.count.item() == len(bf.documents(batch.mask, batch.document_ids))
    for name in ("policy_loss", "value_loss"):
        torch.testing.assert_close(getattr(out, name), expected[name], rtol=1e-12, atol=1e-14)
        for ours, theirs in ((logprobs, ref_logprobs), (values, ref_values)):
            torch.testing.assert_close(
                _grad(getattr(out, name), ours), _grad(expected[name], theirs), rtol=1e-12, atol=1e-14
            )
    # The policy part never trains the value network and vice versa.
    assert torch.autograd.grad(out.policy_loss, [values], allow_unused=True, retain_graph=True) == (None,)
    assert torch.autograd.grad(out.value_loss, [logprobs], allow_unused=True) == (None,)


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
def test_sequence_logprobs_are_per_document_sums(layout):
    batch = random_batch(layout, seed=42)
    logprobs = batch.logprobs.clone().requires_grad_()
    got = sequence_logprobs(logprobs, batch.mask, document_ids=batch.document_ids)
    expected = torch.stack(bf.sequence_sums(batch.logprobs, batch.mask, batch.document_ids))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    weights = torch.randn(got.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * got).sum(), [logprobs])
    expected_grad = torch.zeros_like(grad)
    for weight, (b, positions) in zip(weights, bf.documents(batch.mask, batch.document_ids)):
        expected_grad[b, positions] = weight
    torch.testing.assert_close(grad, expected_grad)


def test_dpo_on_pairs_from_a_batch_matches_brute_force():
    g = torch.Generator().manual_seed(43)
    n = 30
    group_ids = torch.randint(0, 4, (n,), generator=g)
    rewards = (torch.rand(n, generator=g) < 0.5).double()
    chosen, rejected = preference_pairs(
        group_ids, rewards, max_pairs_per_group=5, generator=torch.Generator().manual_seed(0)
    )
    assert chosen.numel() > 0
    logps = (-20 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref = logps.detach() + torch.randn(n, generator=g, dtype=torch.float64)
    out = dpo_loss(logps[chosen], ref[chosen], logps[rejected], ref[rejected], beta=BETA)
    expected = bf.dpo(logps[chosen], ref[chosen], logps[rejected], ref[rejected], BETA)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(out.loss, logps), _grad(expected, logps), rtol=1e-12, atol=1e-14)
    assert out.count.item() == chosen.numel()
    margins = BETA * ((logps[chosen] - ref[chosen]) - (logps[rejected] - ref[rejected]))
    accuracy = out.metrics["reward_accuracy"]
    assert (accuracy[0] / accuracy[1]).item() == pytest.approx((margins > 0).double().mean().item())


def test_dpo_is_stable_for_extreme_margins():
    out = dpo_loss(
        torch.tensor([0.0, -5000.0]),
        torch.tensor([-5000.0, 0.0]),
        torch.tensor([-5000.0, 0.0]),
        torch.tensor([0.0, -5000.0]),
        beta=1.0,
    )
    torch.testing.assert_close(out.loss_sum, torch.tensor(10000.0))  # softplus(-10000) = 0, softplus(10000) = 1e4


def test_preference_pairs_are_correct_times_incorrect_capped_per_prompt():
    # prompt 7: 20 samples, 10 correct -> 100 candidate pairs, capped at 12; prompt 3: all correct -> none;
    # prompt 9: 1 correct, 2 incorrect -> both pairs.
    group_ids = torch.tensor([7] * 20 + [3] * 4 + [9] * 3)
    rewards = torch.tensor([1.0, 0.0] * 10 + [1.0] * 4 + [0.0, 1.0, 0.0])
    chosen, rejected = preference_pairs(group_ids, rewards, generator=torch.Generator().manual_seed(1))
    pairs = list(zip(chosen.tolist(), rejected.tolist()))
    assert len(pairs) == 12 + 2 and len(set(pairs)) == len(pairs)
    for c, r in pairs:
        assert group_ids[c] == group_ids[r] and rewards[c] == 1 and rewards[r] == 0
    assert sorted(pairs[12:]) == [(25, 24), (25, 26)]
    again = preference_pairs(group_ids, rewards, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], chosen) and torch.equal(again[1], rejected)
    other = preference_pairs(group_ids, rewards, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other[0][:12] * 100 + other[1][:12], chosen[:12] * 100 + rejected[:12])


@pytest.mark.parametrize("kl_shift,expect_clamped", [(-3.0, True), (2.0, False)])
def test_kto_matches_brute_force(kl_shift, expect_clamped):
    g = torch.Generator().manual_seed(44)
    n = 9
    policy = (-10 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref = policy.detach() + torch.randn(n, generator=g, dtype=torch.float64)
    desirable = torch.rand(n, generator=g) < 0.5
    # Mismatched pairs (x_i, y_(i+1)): their own log-probs, with a KL estimate of about kl_shift.
    policy_kl = (-10 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref_kl = policy_kl.detach() - kl_shift + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    out = kto_loss(policy, ref, desirable, policy_kl, ref_kl, beta=BETA, desirable_weight=1.0, undesirable_weight=1.33)
    expected, z0 = bf.kto(policy, ref, desirable.tolist(), policy_kl, ref_kl, BETA, 1.0, 1.33)
    assert (z0 == 0.0) == expect_clamped
    assert out.metrics["kl_reference"][0].item() == pytest.approx(z0, abs=1e-14)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(out.loss, policy), _grad(expected, policy), rtol=1e-12, atol=1e-14)
    assert _grad(out.loss, policy_kl).abs().sum() == 0, "the KL reference point is detached"


def test_kto_with_kl_groups_is_each_group_on_its_own():
    """`kl_groups`: several batches in one call (a micro-batch by tokens) == each batch's own kto_loss,
    z0 included (one group clamped at 0, the others not), whatever order the groups' rows come in."""
    g = torch.Generator().manual_seed(45)
    groups = torch.tensor([2, 0, 2, 1, 0, 1, 2, 0])
    n = groups.numel()
    policy = (-10 * torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
    ref = policy.detach() + torch.randn(n, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False, False, True, True, False, True, False])
    shift = torch.tensor([2.0, -3.0, 0.7], dtype=torch.float64)[groups]  # group 1's KL estimate < 0: z0 = 0
    policy_kl = -10 * torch.rand(n, generator=g, dtype=torch.float64)
    ref_kl = policy_kl - shift + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    kwargs = dict(beta=BETA, desirable_weight=1.0, undesirable_weight=1.33)
    out = kto_loss(policy, ref, desirable, policy_kl, ref_kl, kl_groups=groups, **kwargs)
    total, z0s = torch.zeros((), dtype=torch.float64), []
    for group in range(3):
        rows = groups == group
        expected, z0 = bf.kto(
            policy[rows], ref[rows], desirable[rows].tolist(), policy_kl[rows], ref_kl[rows], BETA, 1.0, 1.33
        )
        total, z0s = total + expected * int(rows.sum()), z0s + [z0]
    assert z0s[1] == 0.0 and min(z0s[0], z0s[2]) > 0
    torch.testing.assert_close(out.loss_sum, total, rtol=1e-12, atol=1e-14)
    assert out.count.item() == n
    torch.testing.assert_close(_grad(out.loss_sum, policy), _grad(total, policy), rtol=1e-12, atol=1e-14)
    reference = out.metrics["kl_reference"]
    assert (reference[0] / reference[1]).item() == pytest.approx(sum(z0s) / 3, abs=1e-14)
    one = kto_loss(policy, ref, desirable, policy_kl, ref_kl, kl_groups=torch.zeros(n, dtype=torch.long), **kwargs)
    torch.testing.assert_close(one.loss, kto_loss(policy, ref, desirable, policy_kl, ref_kl, **kwargs).loss)
    with pytest.raises(ValueError, match="kl_groups"):
        kto_loss(policy, ref, desirable, policy_kl[:-1], ref_kl[:-1], kl_groups=groups, **kwargs)
    with pytest.raises(ValueError, match="integer"):
        kto_loss(policy, ref, desirable, policy_kl, ref_kl, kl_groups=groups.double(), **kwargs)


@pytest.mark.parametrize("layout", sorted(bf.LAYOUTS))
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_and_rejection_sampling_match_brute_force(layout, reduction):
    batch = random_batch(layout, seed=46, process_rewards=False)
    logprobs = batch.logprobs.clone().requires_grad_()
    sft = sft_loss(logprobs, batch.mask, reduction=reduction, document_ids=batch.document_ids)
    expected = bf.nll(logprobs, batch.mask, batch.document_ids, reduction)
    torch.testing.assert_close(sft.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(sft.loss, logprobs), _grad(expected, logprobs), rtol=1e-12, atol=1e-14)

    rs = rejection_sampling_loss(
        logprobs, batch.rewards, batch.mask, reduction=reduction, document_ids=batch.document_ids
    )

    def correct(b, positions):
        return float(batch.rewards[b, positions].sum()) >= 1.0

    docs = bf.documents(batch.mask, batch.document_ids)
    kept = [(b, positions) for b, positions in docs if correct(b, positions)]
    assert 0 < len(kept) < len(docs), "the test batch should hold correct and incorrect responses"
    expected = bf.nll(logprobs, batch.mask, batch.document_ids, reduction, keep=correct)
    torch.testing.assert_close(rs.loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_grad(rs.loss, logprobs), _grad(expected, logprobs), rtol=1e-12, atol=1e-14)
    expected_count = len(kept) if reduction == "sequence" else sum(len(p) for _, p in kept)
    assert rs.count.item() == expected_count
    accepted = rs.metrics["accepted_frac"]
    assert (accepted[0] / accepted[1]).item() == pytest.approx(len(kept) / len(docs))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_baseline_micro_batch_sums_equal_the_whole_batch(reduction):
    batch = random_batch("packed", seed=46)
    rows = range(batch.mask.shape[0])

    def split(loss_fn):
        whole = loss_fn(slice(None))
        parts = [loss_fn(slice(b, b + 1)) for b in rows]
        total = sum(p.loss_sum for p in parts) / sum(int(p.count) for p in parts)
        torch.testing.assert_close(total, whole.loss, rtol=1e-12, atol=1e-14)

    split(lambda s: sft_loss(batch.logprobs[s], batch.mask[s], reduction=reduction, document_ids=batch.document_ids[s]))
    split(
        lambda s: rejection_sampling_loss(
            batch.logprobs[s], batch.rewards[s], batch.mask[s], reduction=reduction, document_ids=batch.document_ids[s]
        )
    )
    split(
        lambda s: dro_losses(
            batch.logprobs[s],
            batch.ref_logprobs[s],
            batch.values[s],
            batch.rewards[s],
            batch.mask[s],
            beta=BETA,
            document_ids=batch.document_ids[s],
        )
    )


def test_document_ids_from_cu_seqlens():
    ids = document_ids_from_cu_seqlens(torch.tensor([0, 3, 4, 8]), 10)
    assert ids.tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 3, 3]]
