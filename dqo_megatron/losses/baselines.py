"""The paper's baselines: DRO, DPO, KTO, SFT and rejection sampling, with DQO's `(sum, count, metrics)` form.

* DRO (Richemond et al. 2024) is DQO's bandit special case: the whole response is one action, the value is
  read once per response (at the last prompt token, i.e. `V(s_1)`), and
  `L = 1/2 (R - V(x) - beta * log(pi(y|x) / pi_ref(y|x)))^2`, with `sg(V)` for the policy and `sg` of the
  log-ratio for the value network.
* DPO (Rafailov et al. 2023) compares a correct and an incorrect response to the same prompt:
  `-log sigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l)))` on sequence log-prob sums.
* KTO (Ethayarajh et al. 2024) scores single responses against a reference point `z0` (an estimate of
  KL(pi || pi_ref) from mismatched prompt/response pairs) with a sigmoid value function.
* SFT is the negative log-likelihood of reference solutions; rejection sampling (RS) is the same NLL on
  the sampled responses whose reward reaches 1.

Sequence log-prob sums come from per-token tensors through `sequence_logprobs`, and DPO pairs from
`preference_pairs`; both keep to the `[batch, seq]` conventions of `dqo.py` (padding, packing).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dqo_megatron.losses.common import (
    REDUCTIONS,
    LossOutput,
    PolicyValueLossOutput,
    as_bool_mask,
    check_choice,
    check_document_ids,
    check_float,
    check_positive,
    check_tensor,
    check_token_tensors,
    compute_dtype,
    masked,
    ratio_metric,
    reduction_weights,
)
from dqo_megatron.losses.segments import ResponseSegments

Tensor = torch.Tensor


def _segments(response_mask: Tensor, document_ids: Optional[Tensor], shape: torch.Size):
    mask = as_bool_mask(response_mask)
    return mask, ResponseSegments(mask, check_document_ids(document_ids, shape))


def dro_losses(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    document_ids: Optional[Tensor] = None,
) -> PolicyValueLossOutput:
    """DRO's policy and value losses, one term per document (sequence); `count` = number of documents.

    Args (`[batch, seq]`, as in `dqo_losses`): logprobs (gradient), ref_logprobs, values (gradient; only
    `V(s_1)`, the value at each document's first response position = read at the last prompt token, is
    used), rewards (summed over the document: `R = sum_h r_h`), response_mask, document_ids.
    beta: DRO's tau (> 0).

    With `S = sum_h (logp_h - ref_logp_h)` over the document:

        policy: 1/2 * (R - sg(V(s_1)) - beta * S)^2          (gradient into logprobs only)
        value:  1/2 * (R - V(s_1) - beta * sg(S))^2           (gradient into values only)

    Metrics: policy_loss, value_loss, value_mean (V(s_1) per document), reward_mean (R per document),
    log_ratio_mean (S per document), kl_ref and entropy_proxy (per token, as in `dqo_losses`).
    """
    shape = check_token_tensors(
        response_mask, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, rewards=rewards
    )
    for name, tensor in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values)):
        check_float(name, tensor)
    check_positive("beta", beta)
    mask, segments = _segments(response_mask, document_ids, shape)
    dtype = compute_dtype(logprobs, ref_logprobs, values, rewards)
    logp = masked(logprobs, mask, dtype)
    value = masked(values, mask, dtype)
    ref_logp = masked(ref_logprobs, mask, dtype, detach=True)
    reward = masked(rewards, mask, dtype, detach=True)

    zero = torch.zeros_like(logp)
    log_ratio = logp - ref_logp
    # Per-document quantities, written on every token of the document; one term per document is kept
    # (at its last token) so that each sequence counts once.
    sequence_log_ratio = segments.document_total(log_ratio)
    prompt_value = segments.document_total(torch.where(segments.is_first, value, zero))
    sequence_reward = segments.document_total(reward)
    last = segments.is_last
    policy_residual = sequence_reward - prompt_value.detach() - beta * sequence_log_ratio
    value_residual = sequence_reward - prompt_value - beta * sequence_log_ratio.detach()
    policy_loss_sum = torch.where(last, 0.5 * policy_residual.square(), zero).sum()
    value_loss_sum = torch.where(last, 0.5 * value_residual.square(), zero).sum()
    count = segments.num_documents().to(torch.int)

    with torch.no_grad():
        num_tokens = segments.num_tokens()
        metrics = {
            "policy_loss": ratio_metric(policy_loss_sum, count),
            "value_loss": ratio_metric(value_loss_sum, count),
            "value_mean": ratio_metric(torch.where(last, prompt_value, zero).sum(), count),
            "reward_mean": ratio_metric(torch.where(last, sequence_reward, zero).sum(), count),
            "log_ratio_mean": ratio_metric(torch.where(last, sequence_log_ratio, zero).sum(), count),
            "kl_ref": ratio_metric(log_ratio.sum(), num_tokens),
            "entropy_proxy": ratio_metric(-logp.sum(), num_tokens),
        }
    return PolicyValueLossOutput(
        loss_sum=policy_loss_sum + value_loss_sum,
        count=count,
        metrics=metrics,
        policy_loss_sum=policy_loss_sum,
        value_loss_sum=value_loss_sum,
    )


def sequence_logprobs(logprobs: Tensor, response_mask: Tensor, *, document_ids: Optional[Tensor] = None) -> Tensor:
    """Sum of the response log-probs of each document: `[batch, seq]` -> `[num_documents]`.

    `log pi(y|x) = sum_(h in y) logp_h`, differentiable, in fp32 (fp64 for fp64 input). Documents are
    listed in row-major order (row by row, left to right); with `document_ids=None` that is one entry
    per row that has at least one response token. Synchronizes with the device (data-dependent size).
    """
    shape = check_token_tensors(response_mask, logprobs=logprobs)
    check_float("logprobs", logprobs)
    mask, segments = _segments(response_mask, document_ids, shape)
    logp = masked(logprobs, mask, compute_dtype(logprobs))
    return segments.per_document(segments.document_total(logp))


def preference_pairs(
    group_ids: Tensor, rewards: Tensor, *, max_pairs_per_group: int = 12, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """DPO pairs: within each group (prompt), every (i, j) with `rewards[i] > rewards[j]`, at most
    `max_pairs_per_group` of them per group, drawn uniformly without replacement when there are more.

    Args: group_ids `[n]` integer (the prompt of each response), rewards `[n]` (per response; with 0/1
    rewards the pairs are correct x incorrect). Returns `(chosen_index, rejected_index)`, each `[pairs]`
    int64 indices (on the CPU) into the `n` responses, grouped by prompt in order of first appearance.
    """
    check_tensor("group_ids", group_ids, ndim=1)
    check_tensor("rewards", rewards, ndim=1)
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but rewards has {tuple(rewards.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if not isinstance(max_pairs_per_group, int) or max_pairs_per_group < 1:
        raise ValueError(f"max_pairs_per_group={max_pairs_per_group!r} must be a positive integer")
    group_ids, rewards = group_ids.cpu(), rewards.cpu()
    chosen, rejected = [], []
    _, group_index = torch.unique(group_ids, return_inverse=True)
    for group in dict.fromkeys(group_index.tolist()):  # prompts in order of first appearance
        members = (group_index == group).nonzero().flatten()
        better = rewards[members, None] > rewards[None, members]
        winner, loser = better.nonzero(as_tuple=True)
        if winner.numel() > max_pairs_per_group:
            keep = torch.randperm(winner.numel(), generator=generator)[:max_pairs_per_group].sort().values
            winner, loser = winner[keep], loser[keep]
        chosen.append(members[winner])
        rejected.append(members[loser])
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat(chosen) if chosen else empty), (torch.cat(rejected) if rejected else empty)


def _check_sequence_tensors(**tensors: Tensor) -> torch.Size:
    shape = None
    for name, tensor in tensors.items():
        check_tensor(name, tensor, ndim=1)
        if shape is None:
            shape = tensor.shape
        elif tensor.shape != shape:
            first = next(iter(tensors))
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {first} has shape {tuple(shape)}")
    return shape


def dpo_loss(
    chosen_logps: Tensor, ref_chosen_logps: Tensor, rejected_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float
) -> LossOutput:
    """DPO on `[pairs]` sequence log-prob sums (see `sequence_logprobs`, `preference_pairs`).

        loss_p = -log sigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l)))

    `loss_sum` = sum over pairs, `count` = number of pairs; gradient only into chosen/rejected logps.
    Metrics: dpo_loss, reward_accuracy (fraction of pairs with a positive margin), reward_margin_mean,
    chosen_reward_mean and rejected_reward_mean (implicit rewards `beta * (logp - ref_logp)`).
    """
    _check_sequence_tensors(
        chosen_logps=chosen_logps,
        ref_chosen_logps=ref_chosen_logps,
        rejected_logps=rejected_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    for name, tensor in (
        ("chosen_logps", chosen_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("rejected_logps", rejected_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        check_float(name, tensor)
    check_positive("beta", beta)
    dtype = compute_dtype(chosen_logps, ref_chosen_logps, rejected_logps, ref_rejected_logps)
    chosen_reward = beta * (chosen_logps.to(dtype) - ref_chosen_logps.detach().to(dtype))
    rejected_reward = beta * (rejected_logps.to(dtype) - ref_rejected_logps.detach().to(dtype))
    margin = chosen_reward - rejected_reward
    loss_sum = F.softplus(-margin).sum()  # -log sigmoid(m) = softplus(-m), stable for any m
    count = torch.tensor(margin.numel(), dtype=torch.int, device=margin.device)
    with torch.no_grad():
        metrics = {
            "dpo_loss": ratio_metric(loss_sum, count),
            "reward_accuracy": ratio_metric((margin > 0).sum().to(dtype), count),
            "reward_margin_mean": ratio_metric(margin.sum(), count),
            "chosen_reward_mean": ratio_metric(chosen_reward.sum(), count),
            "rejected_reward_mean": ratio_metric(rejected_reward.sum(), count),
        }
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    policy_kl_logps: Tensor,
    ref_kl_logps: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_groups: Optional[Tensor] = None,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024) on `[n]` sequence log-prob sums.

    Args: policy_logps / ref_logps `[n]`: log pi(y_i|x_i) and log pi_ref(y_i|x_i); desirable `[n]` bool
    (e.g. reward 1); policy_kl_logps / ref_kl_logps `[m]`: the same for mismatched pairs (x_i, y_j), j != i,
    from this batch (e.g. y_(i+1 mod n) with x_i, as in TRL).

        r_i   = log pi(y_i|x_i) - log pi_ref(y_i|x_i)
        z0    = max(0, mean_k (policy_kl_logps_k - ref_kl_logps_k))     (detached)
        loss_i = lambda_D * (1 - sigmoid(beta * (r_i - z0)))   if desirable
                 lambda_U * (1 - sigmoid(beta * (z0 - r_i)))   otherwise

    i.e. `lambda_y - v(x, y)` of the paper. `loss_sum` = sum over the n responses, `count` = n.
    z0 is this batch's estimate; pass gathered tensors for a data-parallel-wide one.
    `kl_groups` `[n]` int (then m = n): several batches at once, each with its own z0 -- response i and
    mismatched pair i belong to batch kl_groups[i], and z0 above is taken over that batch's pairs (a
    micro-batch by tokens holds several of the padded micro-batches' KL groups).
    Metrics: kto_loss, kl_reference (z0; the mean over groups), desirable_reward_mean,
    undesirable_reward_mean (mean r_i).
    """
    _check_sequence_tensors(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    _check_sequence_tensors(policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps)
    for name, tensor in (
        ("policy_logps", policy_logps),
        ("ref_logps", ref_logps),
        ("policy_kl_logps", policy_kl_logps),
        ("ref_kl_logps", ref_kl_logps),
    ):
        check_float(name, tensor)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got dtype {desirable.dtype}")
    if policy_kl_logps.numel() == 0:
        raise ValueError("policy_kl_logps is empty: KTO needs at least one mismatched pair for its KL estimate")
    check_positive("beta", beta)
    check_positive("desirable_weight", desirable_weight)
    check_positive("undesirable_weight", undesirable_weight)
    dtype = compute_dtype(policy_logps, ref_logps, policy_kl_logps, ref_kl_logps)
    log_ratio = policy_logps.to(dtype) - ref_logps.detach().to(dtype)
    with torch.no_grad():
        kl_terms = policy_kl_logps.to(dtype) - ref_kl_logps.to(dtype)
        if kl_groups is None:
            group_z0 = kl_terms.mean().clamp(min=0)[None]
            z0 = group_z0[0]
        else:
            group_z0, z0 = _grouped_reference_points(kl_terms, kl_groups, n=policy_logps.numel())
    # 1 - sigmoid(x) = sigmoid(-x), without the cancellation near x >> 0.
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (log_ratio - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - log_ratio)),
    )
    loss_sum = losses.sum()
    count = torch.tensor(losses.numel(), dtype=torch.int, device=losses.device)
    with torch.no_grad():
        zero = torch.zeros_like(log_ratio)
        metrics = {
            "kto_loss": ratio_metric(loss_sum, count),
            "kl_reference": ratio_metric(group_z0.sum(), group_z0.numel()),
            "desirable_reward_mean": ratio_metric(torch.where(desirable, log_ratio, zero).sum(), desirable.sum()),
            "undesirable_reward_mean": ratio_metric(torch.where(desirable, zero, log_ratio).sum(), (~desirable).sum()),
        }
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)


def _grouped_reference_points(kl_terms: Tensor, kl_groups: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """KTO's z0 per group: ``([G] z0 of each group present, [n] the z0 of each response's group)``."""
    if kl_groups.shape != (n,) or kl_terms.numel() != n:
        raise ValueError(
            f"kl_groups of shape {tuple(kl_groups.shape)} with {n} responses and {kl_terms.numel()} "
            f"mismatched pairs: want one group per response and as many pairs ([{n}])"
        )
    if kl_groups.dtype in (torch.bool,) or kl_groups.is_floating_point():
        raise ValueError(f"kl_groups must be an integer tensor, got dtype {kl_groups.dtype}")
    present, index = torch.unique(kl_groups.to(kl_terms.device), return_inverse=True)
    sums = torch.zeros(present.numel(), dtype=kl_terms.dtype, device=kl_terms.device).index_add_(0, index, kl_terms)
    counts = torch.bincount(index, minlength=present.numel()).to(kl_terms.dtype)
    group_z0 = (sums / counts).clamp(min=0)
    return group_z0, group_z0[index]


def _nll(segments: ResponseSegments, logp: Tensor, reduction: str) -> tuple[Tensor, Tensor]:
    per_token, count = reduction_weights(segments, reduction, logp.dtype)
    return -(per_token * logp).sum(), count


def sft_loss(
    logprobs: Tensor, response_mask: Tensor, *, reduction: str = "token", document_ids: Optional[Tensor] = None
) -> LossOutput:
    """Negative log-likelihood of the response tokens: `-mean_h logp_h` (token or sequence mean).

    `[batch, seq]` inputs as in `dqo_losses`; `count` = response tokens (token) or documents (sequence).
    Metrics: nll.
    """
    shape = check_token_tensors(response_mask, logprobs=logprobs)
    check_float("logprobs", logprobs)
    check_choice("reduction", reduction, REDUCTIONS)
    mask, segments = _segments(response_mask, document_ids, shape)
    loss_sum, count = _nll(segments, masked(logprobs, mask, compute_dtype(logprobs)), reduction)
    return LossOutput(loss_sum=loss_sum, count=count, metrics={"nll": ratio_metric(loss_sum, count)})


def rejection_sampling_loss(
    logprobs: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
    *,
    min_reward: float = 1.0,
    reduction: str = "token",
    document_ids: Optional[Tensor] = None,
) -> LossOutput:
    """Rejection sampling: the SFT NLL restricted to documents whose total reward `sum_h r_h` is at least
    `min_reward` (1.0: the correct responses under the paper's 0/1 outcome reward).

    `count` = response tokens (token) or documents (sequence) of the accepted documents only.
    Metrics: nll, accepted_frac (accepted documents / documents).
    """
    shape = check_token_tensors(response_mask, logprobs=logprobs, rewards=rewards)
    check_float("logprobs", logprobs)
    check_choice("reduction", reduction, REDUCTIONS)
    mask, segments = _segments(response_mask, document_ids, shape)
    dtype = compute_dtype(logprobs)
    with torch.no_grad():
        accepted = mask & (segments.document_total(masked(rewards, mask, dtype, detach=True)) >= min_reward)
    # Whole documents are accepted or rejected, so the accepted tokens keep their documents' chains.
    accepted_segments = ResponseSegments(accepted, check_document_ids(document_ids, shape))
    loss_sum, count = _nll(accepted_segments, masked(logprobs, accepted, dtype), reduction)
    metrics = {
        "nll": ratio_metric(loss_sum, count),
        "accepted_frac": ratio_metric(accepted_segments.num_documents().to(dtype), segments.num_documents()),
    }
    return LossOutput(loss_sum=loss_sum, count=count, metrics=metrics)
