"""DQO: Direct Q-function Optimization (Ji et al. 2024, arXiv 2410.09302), as pure tensor functions.

Generating a response is a token-level MDP: the state `s_h` is the prompt plus the first `h-1` response
tokens, the action `a_h` is the next token, and a reward `r_h` may arrive on any token (in the paper:
1 on the last token of a correct answer, optionally process rewards on the last token of a good
reasoning step). We want the policy that maximizes the reward minus `beta` times the KL divergence to a
reference model. Its soft-optimal Q-function obeys `Q*(s, a) = beta * log pi*(a|s) + V*(s)`, so DQO
*parameterizes* the Q-function by the language model itself plus a value network:

    Q(s_h, a_h) = beta * log pi_theta(a_h|s_h) + V_phi(s_h)

and fits it to a soft Bellman target. Per response token `h = 1..H` (all tensors `[batch, seq]`, index h
holding `logp_h = log pi_theta(a_h|s_h)`, `ref_logp_h`, `V_h = V_phi(s_h)` and `r_h`), with the
log-ratio `rho_h = logp_h - ref_logp_h` and `sg` = stop-gradient:

    shaped reward        r~_h = r_h - beta * sg(rho_h)                  (the KL penalty paid per token)
    lambda-return        G_h  = r~_h + (1 - lam) * sg(V_(h+1)) + lam * G_(h+1),   G_(H+1) = V_(H+1) = 0
    value loss           L_V  = mean_h  w_h * 1/2 * (V_h - G_h)^2
    policy (= Q) loss    L_pi = mean_h  w_h * 1/2 * (beta * rho_h + sg(V_h) - r_h - G_(h+1))^2

`G_h` is the lambda-weighted average of the n-step returns `sum_(t=h..h+n-1) r~_t + V_(h+n)`: `lam = 1`
(the paper's best setting) is the Monte-Carlo return of the shaped reward, `lam = 0` the one-step target
`r~_h + V_(h+1)`. In `L_pi`, `G_(h+1)` stands in for `V(s_(h+1))`, so with `lam = 0` it is the one-step
soft-Bellman residual `beta * log(pi/pi_ref) + V(s_h) - r_h - V(s_(h+1))`. The targets carry no
gradient; `L_pi` trains only the policy (through `logp_h`), `L_V` only the value network. At `lam = 1`,
`r_h + G_(h+1) - beta * rho_h = G_h`, so the policy gradient per token is
`beta * w_h * (V_h - G_h) * grad logp_h`: an advantage-weighted log-likelihood step with `V` as baseline.

The data is offline (sampled from a behavior policy `mu`, in the paper the reference model), so each
token's loss is weighted by a truncated importance weight computed in log space without gradient:
trajectory level `w = min(exp(sum_h (logp_h - mu_logp_h)), c)` on every token of the response (the
default), prefix level `w_h = min(exp(sum_(t<=h) (logp_t - mu_logp_t)), c)`, or off (`w = 1`).

Rows may be left- or right-padded and may pack several documents; a 0/1 `response_mask` marks the
response tokens and optional per-token `document_ids` separate packed documents. Returns, weights and
means never cross a document boundary (see `segments.py`). Everything is computed in fp32 (fp64 if an
input is fp64) whatever the input dtype, and returned in Megatron's `(loss_sum, count, metrics)` form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from dqo_megatron.losses.common import (
    REDUCTIONS,
    PolicyValueLossOutput,
    as_bool_mask,
    check_choice,
    check_document_ids,
    check_float,
    check_positive,
    check_token_tensors,
    compute_dtype,
    masked,
    masked_max,
    ratio_metric,
    reduction_weights,
)
from dqo_megatron.losses.segments import ResponseSegments

Tensor = torch.Tensor

IS_LEVELS = ("trajectory", "prefix", "off")
IS_TARGETS = ("both", "policy", "value")
"""Which loss the importance weights multiply (the other gets w = 1): the paper's ablation."""


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam!r} must be in [0, 1]")


def _returns(
    segments: ResponseSegments, rewards: Tensor, logp: Tensor, ref_logp: Tensor, values: Tensor, beta: float, lam: float
) -> Tensor:
    """lambda-returns on prepared (masked, detached, compute-dtype) tensors."""
    shaped_reward = rewards - beta * (logp - ref_logp)
    one_step_part = shaped_reward + (1.0 - lam) * segments.next_value(values)
    return segments.discounted_suffix_sum(one_step_part, lam)


def lambda_returns(
    rewards: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    values: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    lam: float,
    document_ids: Optional[Tensor] = None,
) -> Tensor:
    """KL-regularized lambda-returns `G` `[batch, seq]` (no gradient; 0 off the response).

    Args (all `[batch, seq]`, aligned per response position h):
        rewards: r_h (any real dtype).
        logprobs, ref_logprobs: log pi_theta(a_h|s_h), log pi_ref(a_h|s_h).
        values: V(s_h).
        response_mask: 0/1 or bool, 1 on response tokens.
        beta: KL coefficient (> 0). lam: lambda in [0, 1].
        document_ids: optional integer ids separating packed documents in a row (neighbouring documents
            must differ; ids of unmasked positions are ignored). None: one document per row.

    Computes, backwards along each document's response tokens (h+1 = the next response position of
    the same document; after the last one `G = V = 0`):

        r~_h = r_h - beta * sg(logp_h - ref_logp_h)
        G_h  = r~_h + (1 - lam) * sg(V_(h+1)) + lam * G_(h+1)

    which equals the lambda-weighted sum of n-step returns
    `G_h = (1-lam) sum_(n=1..H-h) lam^(n-1) G^(n)_h + lam^(H-h) G^(H-h+1)_h`,
    `G^(n)_h = sum_(t=h..h+n-1) r~_t + V_(h+n)`.
    """
    shape = check_token_tensors(
        response_mask, rewards=rewards, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values
    )
    for name, tensor in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values)):
        check_float(name, tensor)
    check_positive("beta", beta)
    _check_lam(lam)
    mask = as_bool_mask(response_mask)
    segments = ResponseSegments(mask, check_document_ids(document_ids, shape))
    dtype = compute_dtype(logprobs, ref_logprobs, values, rewards)
    with torch.no_grad():
        prepared = [masked(x, mask, dtype, detach=True) for x in (rewards, logprobs, ref_logprobs, values)]
        return _returns(segments, *prepared, beta=beta, lam=lam)


@dataclass(frozen=True)
class ImportanceWeights:
    """Truncated importance weights and their statistics.

    weights: `[batch, seq]`, 0 off the response (after self-normalization when requested).
    mean, max, truncated_fraction: scalars over the response tokens, of the truncated weights *before*
    self-normalization (truncated = the untruncated weight exceeded `clip`).
    """

    weights: Tensor
    mean: Tensor
    max: Tensor
    truncated_fraction: Tensor


def _importance_weights(
    segments: ResponseSegments,
    logp: Tensor,
    behavior_logp: Tensor,
    level: str,
    clip: float,
    self_normalize: bool,
    reduction: str,
) -> ImportanceWeights:
    """Importance weights on prepared (masked, detached, compute-dtype) tensors."""
    mask = segments.mask
    dtype = logp.dtype
    if level == "off":
        weights = mask.to(dtype)
        truncated = torch.zeros_like(mask)
    else:
        log_ratio = logp - behavior_logp
        if level == "trajectory":
            log_weight = segments.document_total(log_ratio)
        else:
            log_weight = segments.prefix_sum(log_ratio)
        log_clip = math.log(clip)
        # Truncate in log space: exp() never sees a value above log(clip), so it cannot overflow.
        truncated = mask & (log_weight > log_clip)
        weights = torch.where(mask, log_weight.clamp(max=log_clip).exp(), torch.zeros_like(log_weight))
    num_tokens = segments.num_tokens().clamp(min=1).to(dtype)
    mean = weights.sum() / num_tokens
    largest = masked_max(weights, mask)
    truncated_fraction = truncated.sum().to(dtype) / num_tokens
    if self_normalize:
        # Divide by the weights' own mean under the loss's reduction, so that the weighted loss becomes
        # sum(w * loss) / sum(w) (token) or its per-sequence analogue (sequence).
        per_token, count = reduction_weights(segments, reduction, dtype)
        normalizer = (per_token * weights).sum() / count.clamp(min=1).to(dtype)
        weights = weights / torch.where(normalizer > 0, normalizer, torch.ones_like(normalizer))
    return ImportanceWeights(weights=weights, mean=mean, max=largest, truncated_fraction=truncated_fraction)


def truncated_importance_weights(
    logprobs: Tensor,
    behavior_logprobs: Tensor,
    response_mask: Tensor,
    *,
    level: str = "trajectory",
    clip: float = 2.0,
    self_normalize: bool = False,
    reduction: str = "token",
    document_ids: Optional[Tensor] = None,
) -> ImportanceWeights:
    """Truncated importance weights of the current policy against the behavior policy (no gradient).

    Args (`[batch, seq]`): logprobs = log pi_theta(a_h|s_h); behavior_logprobs = log mu(a_h|s_h) of the
    model that sampled the data; response_mask 0/1; document_ids as in `lambda_returns`.
    level:
        "trajectory": w_h = min(exp(sum_(t in doc) (logp_t - mu_logp_t)), clip) on every token of a document;
        "prefix":     w_h = min(exp(sum_(t<=h, t in doc) (logp_t - mu_logp_t)), clip);
        "off":        w_h = 1.
    clip: truncation constant c > 0 (inf: no truncation; then exp may overflow).
    self_normalize: divide the weights by their mean over this batch, taken as `reduction` says
        ("token": over response tokens; "sequence": per-document mean, then over documents).

    Sums are taken in log space and truncated before exponentiation. Returns `ImportanceWeights`
    (weights `[batch, seq]` plus mean / max / truncated fraction over response tokens).
    """
    shape = check_token_tensors(response_mask, logprobs=logprobs, behavior_logprobs=behavior_logprobs)
    check_float("logprobs", logprobs)
    check_float("behavior_logprobs", behavior_logprobs)
    check_choice("level", level, IS_LEVELS)
    check_positive("clip", clip)
    check_choice("reduction", reduction, REDUCTIONS)
    mask = as_bool_mask(response_mask)
    segments = ResponseSegments(mask, check_document_ids(document_ids, shape))
    dtype = compute_dtype(logprobs, behavior_logprobs)
    with torch.no_grad():
        logp = masked(logprobs, mask, dtype, detach=True)
        behavior_logp = masked(behavior_logprobs, mask, dtype, detach=True)
        return _importance_weights(segments, logp, behavior_logp, level, clip, self_normalize, reduction)


def dqo_losses(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    behavior_logprobs: Optional[Tensor],
    values: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
    *,
    beta: float,
    lam: float,
    is_level: str = "trajectory",
    is_clip: float = 2.0,
    is_self_normalize: bool = False,
    is_apply_to: str = "both",
    reduction: str = "token",
    document_ids: Optional[Tensor] = None,
) -> PolicyValueLossOutput:
    """DQO's policy (Q-function) loss and value loss, in Megatron's `(loss_sum, count, metrics)` form.

    Args (`[batch, seq]`, aligned per response position h):
        logprobs: log pi_theta(a_h|s_h), with gradient (the only path of the policy loss's gradient).
        ref_logprobs: log pi_ref(a_h|s_h) (detached).
        behavior_logprobs: log mu(a_h|s_h) of the sampler, for importance weights; None = ref_logprobs
            (the paper samples from the reference model).
        values: V_phi(s_h), with gradient (the only path of the value loss's gradient).
        rewards: r_h. response_mask: 0/1. document_ids: packed documents, as in `lambda_returns`.
        beta: KL coefficient (> 0); lam: lambda in [0, 1] (1 = Monte-Carlo, the paper's default).
        is_level / is_clip / is_self_normalize: see `truncated_importance_weights`.
        is_apply_to: "both" (default), "policy" or "value": the loss(es) the weights multiply; the
            other loss gets w = 1 (the paper ablates IS on each loss separately).
        reduction: "token" (mean over all response tokens) or "sequence" (mean per document, then over
            documents).

    Per token, with G the lambda-returns and w the importance weights (both without gradient):

        value:  l^V_h  = w_h * 1/2 * (V_h - G_h)^2
        policy: l^pi_h = w_h * 1/2 * (beta * (logp_h - ref_logp_h) + sg(V_h) - r_h - G_(h+1))^2

    Returns `PolicyValueLossOutput`: `policy_loss_sum`, `value_loss_sum` (token: sum over tokens;
    sequence: sum over documents of their token mean), `count` (tokens or documents), `loss_sum` = their
    sum, `policy_loss` / `value_loss` = sum / count, and metrics (`[numerator, denominator]` each):
    policy_loss, value_loss, value_mean, td_error_abs_mean (|r~_h + V_(h+1) - V_h|), return_mean,
    return_sq_mean (mean G^2), advantage_mean and advantage_sq_mean (mean of A_h = G_h - V_h and of its
    square: with the return moments they give the value's explained variance and the advantage's std,
    see `dqo_megatron.training.algorithms.derived_metrics`), is_weight_mean, is_weight_max,
    is_truncated_frac, kl_ref (mean logp - ref_logp), entropy_proxy (-mean logp); all but the two
    losses are means over response tokens.
    """
    shape = _check_dqo_tensors(logprobs, ref_logprobs, behavior_logprobs, values, rewards, response_mask)
    _check_dqo_options(beta, lam, is_level, is_clip, is_apply_to, reduction)
    mask = as_bool_mask(response_mask)
    segments = ResponseSegments(mask, check_document_ids(document_ids, shape))
    dtype = compute_dtype(logprobs, ref_logprobs, behavior_logprobs, values, rewards)

    # logp and value keep their gradient: each is the only path of one loss's gradient.
    logp = masked(logprobs, mask, dtype)
    value = masked(values, mask, dtype)
    ref_logp = masked(ref_logprobs, mask, dtype, detach=True)
    reward = masked(rewards, mask, dtype, detach=True)
    behavior_logp = ref_logp if behavior_logprobs is None else masked(behavior_logprobs, mask, dtype, detach=True)

    with torch.no_grad():
        returns = _returns(segments, reward, logp.detach(), ref_logp, value.detach(), beta, lam)
        importance = _importance_weights(
            segments, logp.detach(), behavior_logp, is_level, is_clip, is_self_normalize, reduction
        )
        policy_weights, value_weights, count = _loss_weights(segments, importance.weights, is_apply_to, reduction)

    policy_loss_sum = _policy_loss_sum(segments, logp, ref_logp, value, reward, returns, policy_weights, beta)
    value_loss_sum = _value_loss_sum(value, returns, value_weights)
    metrics = _dqo_metrics(
        segments, logp, ref_logp, value, reward, returns, importance, beta, policy_loss_sum, value_loss_sum, count
    )
    return PolicyValueLossOutput(
        loss_sum=policy_loss_sum + value_loss_sum,
        count=count,
        metrics=metrics,
        policy_loss_sum=policy_loss_sum,
        value_loss_sum=value_loss_sum,
    )


def _check_dqo_tensors(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    behavior_logprobs: Optional[Tensor],
    values: Tensor,
    rewards: Tensor,
    response_mask: Tensor,
) -> torch.Size:
    """Check `dqo_losses`' tensors (same `[batch, seq]` shape, floating log-probs and values); return the shape."""
    shape = check_token_tensors(
        response_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        behavior_logprobs=behavior_logprobs,
        values=values,
        rewards=rewards,
    )
    for name, tensor in (
        ("logprobs", logprobs),
        ("ref_logprobs", ref_logprobs),
        ("behavior_logprobs", behavior_logprobs),
        ("values", values),
    ):
        if tensor is not None:
            check_float(name, tensor)
    return shape


def _check_dqo_options(
    beta: float, lam: float, is_level: str, is_clip: float, is_apply_to: str, reduction: str
) -> None:
    """Check `dqo_losses`' coefficients and choices (ValueError naming the argument)."""
    check_positive("beta", beta)
    _check_lam(lam)
    check_choice("is_level", is_level, IS_LEVELS)
    check_positive("is_clip", is_clip)
    check_choice("is_apply_to", is_apply_to, IS_TARGETS)
    check_choice("reduction", reduction, REDUCTIONS)


def _loss_weights(
    segments: ResponseSegments, importance_weights: Tensor, is_apply_to: str, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token weights of the policy and the value loss `[batch, seq]` each, and the reduction's count.

    Each is the reduction's weight (1 per token, or 1/len(document) per token for "sequence"), times the
    importance weight when `is_apply_to` names that loss; summing weight x loss then gives Megatron's
    `loss_sum` for `count` (tokens or documents).
    """
    reduce_weights, count = reduction_weights(segments, reduction, importance_weights.dtype)
    weighted = importance_weights * reduce_weights
    policy_weights = weighted if is_apply_to in ("both", "policy") else reduce_weights
    value_weights = weighted if is_apply_to in ("both", "value") else reduce_weights
    return policy_weights, value_weights, count


def _policy_loss_sum(
    segments: ResponseSegments,
    logp: Tensor,
    ref_logp: Tensor,
    value: Tensor,
    reward: Tensor,
    returns: Tensor,
    weights: Tensor,
    beta: float,
) -> Tensor:
    """sum_h w_h * 1/2 * (beta * (logp_h - ref_logp_h) + sg(V_h) - r_h - G_(h+1))^2, a scalar.

    The Q-function `beta * log pi + V` against its soft-Bellman target `r_h + G_(h+1)`, where `G_(h+1)`
    (`[batch, seq]` `returns` shifted to the next response position, 0 after a document's last) stands in
    for V(s_(h+1)). Only `logp` carries gradient: this loss moves the policy, not the value network.
    """
    with torch.no_grad():
        next_return = segments.next_value(returns)
    q_residual = beta * (logp - ref_logp) + value.detach() - reward - next_return
    return (weights * 0.5 * q_residual.square()).sum()


def _value_loss_sum(value: Tensor, returns: Tensor, weights: Tensor) -> Tensor:
    """sum_h w_h * 1/2 * (V_h - G_h)^2 over `[batch, seq]` tensors, a scalar: V regressed on the lambda-returns."""
    return (weights * 0.5 * (value - returns).square()).sum()


@torch.no_grad()
def _dqo_metrics(
    segments: ResponseSegments,
    logp: Tensor,
    ref_logp: Tensor,
    value: Tensor,
    reward: Tensor,
    returns: Tensor,
    importance: ImportanceWeights,
    beta: float,
    policy_loss_sum: Tensor,
    value_loss_sum: Tensor,
    count: Tensor,
) -> dict[str, Tensor]:
    """`dqo_losses`' metrics, each `[numerator, denominator]` (see its docstring); inputs `[batch, seq]`."""
    mask = segments.mask
    num_tokens = segments.num_tokens()
    log_ratio = logp - ref_logp
    shaped_reward = reward - beta * log_ratio
    td_error = torch.where(mask, shaped_reward + segments.next_value(value) - value, torch.zeros_like(value))
    return {
        "policy_loss": ratio_metric(policy_loss_sum, count),
        "value_loss": ratio_metric(value_loss_sum, count),
        "value_mean": ratio_metric(value.sum(), num_tokens),
        "td_error_abs_mean": ratio_metric(td_error.abs().sum(), num_tokens),
        "return_mean": ratio_metric(returns.sum(), num_tokens),
        "return_sq_mean": ratio_metric(returns.square().sum(), num_tokens),
        "advantage_mean": ratio_metric((returns - value).sum(), num_tokens),
        "advantage_sq_mean": ratio_metric((returns - value).square().sum(), num_tokens),
        "is_weight_mean": ratio_metric(importance.mean * num_tokens, num_tokens),
        # A maximum does not add up: reported as [max, 1], Megatron shows the mean of micro-batch maxima.
        "is_weight_max": ratio_metric(importance.max, 1),
        "is_truncated_frac": ratio_metric(importance.truncated_fraction * num_tokens, num_tokens),
        "kl_ref": ratio_metric(log_ratio.sum(), num_tokens),
        "entropy_proxy": ratio_metric(-logp.sum(), num_tokens),
    }
