"""forward_step / loss_func for DQO and the baselines, on Megatron's contract.

A micro-batch is a dict of ``[b, s]`` tensors aligned per position h (the model reads `tokens[h]`
and predicts `labels[h] = tokens[h+1]`, so index h holds log pi(a_h|s_h), V(s_h) and r_h):

    tokens, labels, position_ids      model inputs
    response_mask                     1 where labels[h] is a response token
    rewards                           r_h (outcome on the last response token, process rewards inside)
    behavior_logprobs   (optional)    log mu(a_h|s_h) of the sampler; absent = the reference's
    ref_logprobs        (optional)    precomputed log pi_ref(a_h|s_h); absent = the reference model's
    document_ids        (optional)    packed rows: a different id per document

`rl_forward_step` runs the `PolicyValueModel` on this context-parallel rank's part of the sequence;
`rl_loss_func` gathers the per-token outputs into whole sequences (the lambda-returns run backwards
over a whole response) and calls the pure losses of `dqo_megatron.losses`. Every CP rank then
computes the loss of the whole sequence and counts all its tokens: Megatron sums gradients and
token counts over the DP x CP group, so both are cp times larger and the division cancels
(see `dqo_megatron.logprobs.gather`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from dqo_megatron.config import RunConfig
from dqo_megatron.logprobs import gather_from_context_parallel
from dqo_megatron.losses import (
    dpo_loss,
    dqo_losses,
    dro_losses,
    kto_loss,
    rejection_sampling_loss,
    sequence_logprobs,
    sft_loss,
)
from dqo_megatron.training.policy_value import LOGP, REF_LOGP, VALUE
from dqo_megatron.training.step import model_inputs

NEEDS_VALUE = {"dqo": True, "dro": True, "sft": False, "rs": False, "dpo": False, "kto": False}
"""Which algorithms learn a value network."""
NEEDS_REFERENCE = {"dqo": True, "dro": True, "sft": False, "rs": False, "dpo": True, "kto": True}
"""Which algorithms need reference log-probs (from the data or a reference model)."""
BATCH_MODE = {"dqo": "samples", "dro": "samples", "sft": "samples", "rs": "samples", "dpo": "pairs", "kto": "kto"}
"""How micro-batches are built (see `dqo_megatron.training.data.MicroBatches`)."""
ROWS_PER_ITEM = {"samples": 1, "pairs": 2, "kto": 2}
"""Rows of a micro-batch per `train.micro_batch_size` unit."""


def rl_forward_step(run: RunConfig, data_iterator: Iterator[dict], model: torch.nn.Module, *,
                    policy_weight: float = 1.0):  # fmt: skip
    """Forward one micro-batch; returns ``(per-token outputs, partial(rl_loss_func, run, batch))``.

    `policy_weight` multiplies the policy's loss (0 during the critic warm-up, `value.warmup_steps`).
    """
    batch = next(data_iterator)
    inputs = model_inputs(batch)
    output = model(inputs["tokens"], inputs["position_ids"], inputs["labels"])
    return output, partial(rl_loss_func, run, batch, policy_weight=policy_weight)


def rl_loss_func(run: RunConfig, batch: dict, output: torch.Tensor, *, policy_weight: float = 1.0):
    """``(loss_sum, count, metrics)`` of `run.algorithm` for one micro-batch.

    output: ``[b, s_local, 3]`` from `PolicyValueModel` (log pi, V, log pi_ref) on this CP rank.
    For DQO and DRO the summed loss is ``policy_weight * policy_loss + value.loss_coef * value_loss``.
    """
    output = gather_from_context_parallel(output, dim=1)
    logp, values = output[..., LOGP], output[..., VALUE]
    ref = batch.get("ref_logprobs")
    if ref is None:
        ref = output[..., REF_LOGP].detach()
        if NEEDS_REFERENCE[run.algorithm] and torch.isnan(ref).any():
            raise ValueError(f"algorithm={run.algorithm} needs reference log-probs: the batch has no "
                             "'ref_logprobs' and the run holds no reference model")  # fmt: skip
    mask, rewards, docs = batch["response_mask"], batch["rewards"], batch.get("document_ids")
    behavior = batch.get("behavior_logprobs")
    if behavior is not None:  # documents without sampler log-probs were sampled from the reference
        behavior = torch.where(torch.isnan(behavior), ref, behavior)
    loss, extra = run.loss, {}
    if NEEDS_VALUE[run.algorithm]:
        if docs is not None:  # per-row flags and outcomes below assume one document per row
            raise NotImplementedError("packed rows (document_ids) are not supported by the RL loss function yet")
        extra = response_metrics(logp, ref, mask, outcome_rewards(batch, mask, rewards))
        mask, rewards, truncation = handle_truncated(batch, mask, rewards, values,
                                                     "exclude" if run.algorithm == "dro" and
                                                     loss.truncated == "bootstrap" else loss.truncated)  # fmt: skip
        extra.update(truncation)
    if run.algorithm == "dqo":
        out = dqo_losses(logp, ref, behavior, values, rewards, mask, beta=loss.beta,
                         lam=loss.lam, is_level=loss.is_level, is_clip=loss.is_clip,
                         is_self_normalize=loss.is_self_normalize, is_apply_to=loss.is_apply_to,
                         reduction=loss.reduction, document_ids=docs)  # fmt: skip
    elif run.algorithm == "dro":
        out = dro_losses(logp, ref, values, rewards, mask, beta=loss.beta, document_ids=docs)
    elif run.algorithm == "sft":
        out = sft_loss(logp, mask, reduction=loss.reduction, document_ids=docs)
    elif run.algorithm == "rs":
        out = rejection_sampling_loss(logp, rewards, mask, reduction=loss.reduction, document_ids=docs)
    elif run.algorithm == "dpo":  # rows [0, B) chosen, [B, 2B) rejected
        policy_seq, ref_seq = sequence_logprobs(logp, mask), sequence_logprobs(ref, mask)
        half = policy_seq.shape[0] // 2
        out = dpo_loss(policy_seq[:half], ref_seq[:half], policy_seq[half:], ref_seq[half:], beta=loss.beta)
    elif run.algorithm == "kto":  # rows [0, B) the documents, [B, 2B) mismatched prompt/response rows
        policy_seq, ref_seq = sequence_logprobs(logp, mask), sequence_logprobs(ref, mask)
        half = policy_seq.shape[0] // 2
        out = kto_loss(policy_seq[:half], ref_seq[:half], batch["desirable"].to(logp.device).bool(),
                       policy_seq[half:], ref_seq[half:], beta=loss.beta,
                       desirable_weight=loss.kto_desirable_weight, undesirable_weight=loss.kto_undesirable_weight)  # fmt: skip
    else:
        raise ValueError(f"unknown algorithm {run.algorithm!r}")
    loss_sum, count, metrics = out.loss_func_output()
    if NEEDS_VALUE[run.algorithm]:
        loss_sum = policy_weight * out.policy_loss_sum + run.value.loss_coef * out.value_loss_sum
    metrics = {**metrics, **extra}
    metrics["loss"] = torch.stack([loss_sum.detach().float(), count.float()])
    return loss_sum, count, metrics


def outcome_rewards(batch: dict, mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``[b]`` outcome reward of each row: the batch's ``outcome_reward`` when it carries one, else the
    reward on the row's last response token (where preprocessing puts the outcome)."""
    if batch.get("outcome_reward") is not None:
        return batch["outcome_reward"].to(rewards.device, torch.float32)
    last = last_response_position(mask)
    return torch.where(last >= 0, rewards.gather(1, last.clamp(min=0)[:, None])[:, 0].float(),
                       torch.zeros_like(last, dtype=torch.float32))  # fmt: skip


def last_response_position(mask: torch.Tensor) -> torch.Tensor:
    """``[b]`` index of each row's last response position (-1 for a row without one)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def response_metrics(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, outcome: torch.Tensor) -> dict:
    """What tells the policy apart from the value: the mean sequence log-ratio
    ``sum_h (log pi - log pi_ref)`` over correct (outcome > 0) and over incorrect responses, as
    ``[sum, count]`` metrics ``log_ratio_correct`` / ``log_ratio_incorrect`` (one row = one response)."""
    with torch.no_grad():
        m = mask.bool()
        seq = torch.where(m, logp.detach().float() - ref.float(), torch.zeros_like(logp, dtype=torch.float32)).sum(1)
        has = m.any(dim=1)
        good, bad = has & (outcome > 0), has & ~(outcome > 0)
        return {"log_ratio_correct": torch.stack([seq[good].sum(), good.sum().float()]),
                "log_ratio_incorrect": torch.stack([seq[bad].sum(), bad.sum().float()])}  # fmt: skip


def handle_truncated(batch: dict, mask: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor,
                     how: str) -> tuple[torch.Tensor, torch.Tensor, dict]:  # fmt: skip
    """Apply `loss.truncated` to rows whose response was cut by the length limit (``batch["truncated"]``).

    bootstrap: the state after the last token, s_(H+1), is not terminal. The value read one position
    after the last response token (that position's input is a_H, so it is V(s_(H+1))) is added,
    without gradient, to the last token's reward: with G_(H+1) = V_(H+1) = sg(V(s_(H+1))) the
    lambda-return recursion is exactly "reward + bootstrap" at H. A row with no position left after its
    response is excluded instead. exclude: the row's response mask is cleared (no loss, no count).
    terminal: nothing changes. Returns (mask, rewards, metrics ``truncated_bootstrapped`` /
    ``truncated_excluded`` as ``[rows, rows in the batch]``).
    """
    truncated = batch.get("truncated")
    rows = float(mask.shape[0])
    none = {"truncated_bootstrapped": torch.tensor([0.0, rows]), "truncated_excluded": torch.tensor([0.0, rows])}
    if truncated is None or how == "terminal" or not bool(truncated.any()):
        return mask, rewards, {k: v.to(rewards.device) for k, v in none.items()}
    truncated = truncated.to(mask.device).bool()
    last = last_response_position(mask)
    room = (last >= 0) & (last + 1 < mask.shape[1])
    boot = truncated & room if how == "bootstrap" else torch.zeros_like(truncated)
    excluded = truncated & ~boot
    mask = torch.where(excluded[:, None], torch.zeros_like(mask), mask)
    if bool(boot.any()):
        nxt = (last + 1).clamp(max=mask.shape[1] - 1)
        bootstrap_value = values.detach().gather(1, nxt[:, None])[:, 0].to(rewards.dtype)
        add = torch.zeros_like(rewards)
        add.scatter_(1, last.clamp(min=0)[:, None], torch.where(boot, bootstrap_value, torch.zeros_like(bootstrap_value))[:, None])
        rewards = rewards + add
    metrics = {"truncated_bootstrapped": torch.stack([boot.sum().float(), torch.tensor(rows, device=mask.device)]),
               "truncated_excluded": torch.stack([excluded.sum().float(), torch.tensor(rows, device=mask.device)])}  # fmt: skip
    return mask, rewards, {k: v.to(rewards.device) for k, v in metrics.items()}


def derived_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Statistics that need several reduced metrics: the value's explained variance of the returns,
    ``1 - Var(G - V) / Var(G)`` (1: V predicts G; 0: no better than a constant), and the advantage's
    standard deviation ``std(G - V)``; empty when the moments are absent."""
    import math

    needed = ("return_mean", "return_sq_mean", "advantage_mean", "advantage_sq_mean")
    if not all(k in metrics and math.isfinite(metrics[k]) for k in needed):
        return {}
    var_return = metrics["return_sq_mean"] - metrics["return_mean"] ** 2
    var_advantage = max(metrics["advantage_sq_mean"] - metrics["advantage_mean"] ** 2, 0.0)
    out = {"advantage_std": math.sqrt(var_advantage)}
    out["value_explained_var"] = 1.0 - var_advantage / var_return if var_return > 1e-12 else float("nan")
    return out
