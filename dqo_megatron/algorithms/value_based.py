"""What the algorithms that learn a value network (DQO, DRO) share: truncated responses
(`loss.truncated`), the policy/value metrics, and the summed loss
``policy_weight * policy_loss + value.loss_coef * value_loss``."""

from __future__ import annotations

import torch

from dqo_megatron.algorithms.base import LossInputs, LossTriple


def value_inputs(x: LossInputs, truncated: str) -> tuple[LossInputs, dict]:
    """Apply `truncated` (bootstrap, exclude, terminal) to `x`; return the new inputs and the metrics
    ``log_ratio_correct`` / ``log_ratio_incorrect`` / ``truncated_*`` that every value algorithm logs."""
    if x.document_ids is not None:  # per-row flags and outcomes below assume one document per row
        raise NotImplementedError("packed rows (document_ids) are not supported by the RL loss function yet")
    extra = response_metrics(x.logp, x.ref, x.mask, outcome_rewards(x.batch, x.mask, x.rewards))
    mask, rewards, truncation = handle_truncated(x.batch, x.mask, x.rewards, x.values, truncated)
    extra.update(truncation)
    return x.with_(mask=mask, rewards=rewards), extra


def policy_value_triple(out, x: LossInputs, extra: dict) -> LossTriple:
    """``(policy_weight * policy_loss_sum + value.loss_coef * value_loss_sum, count, metrics + extra)``
    of a `PolicyValueLossOutput`."""
    _loss_sum, count, metrics = out.loss_func_output()
    loss_sum = x.policy_weight * out.policy_loss_sum + x.run.value.loss_coef * out.value_loss_sum
    return loss_sum, count, {**metrics, **extra}


VALUE_METRICS = ("log_ratio_correct", "log_ratio_incorrect", "truncated_bootstrapped", "truncated_excluded")
"""Logged by every algorithm that learns a value network (`value_inputs`)."""


def outcome_rewards(batch: dict, mask: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """``[b]`` outcome reward of each row: the batch's ``outcome_reward`` when it carries one, else the
    reward on the row's last response token (where preprocessing puts the outcome)."""
    if batch.get("outcome_reward") is not None:
        return batch["outcome_reward"].to(rewards.device, torch.float32)
    last = last_response_position(mask)
    return torch.where(
        last >= 0,
        rewards.gather(1, last.clamp(min=0)[:, None])[:, 0].float(),
        torch.zeros_like(last, dtype=torch.float32),
    )


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
        return {
            "log_ratio_correct": torch.stack([seq[good].sum(), good.sum().float()]),
            "log_ratio_incorrect": torch.stack([seq[bad].sum(), bad.sum().float()]),
        }


def handle_truncated(
    batch: dict, mask: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor, how: str
) -> tuple[torch.Tensor, torch.Tensor, dict]:
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
        add.scatter_(
            1,
            last.clamp(min=0)[:, None],
            torch.where(boot, bootstrap_value, torch.zeros_like(bootstrap_value))[:, None],
        )
        rewards = rewards + add
    metrics = {
        "truncated_bootstrapped": torch.stack([boot.sum().float(), torch.tensor(rows, device=mask.device)]),
        "truncated_excluded": torch.stack([excluded.sum().float(), torch.tensor(rows, device=mask.device)]),
    }
    return mask, rewards, {k: v.to(rewards.device) for k, v in metrics.items()}
