"""DQO (Direct Q-function Optimization): the policy as a Q-function fitted to lambda-returns, a value
network alongside (docs/algorithms.md, "DQO")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple
from dqo_megatron.algorithms.value_based import VALUE_METRICS, policy_value_triple, value_inputs
from dqo_megatron.losses import dqo_losses


def loss(x: LossInputs) -> LossTriple:
    """``policy_weight * policy_loss + value.loss_coef * value_loss`` of `dqo_losses`."""
    cfg = x.run.loss
    x, extra = value_inputs(x, cfg.truncated)
    out = dqo_losses(
        x.logp,
        x.ref,
        x.behavior,
        x.values,
        x.rewards,
        x.mask,
        beta=cfg.beta,
        lam=cfg.lam,
        is_level=cfg.is_level,
        is_clip=cfg.is_clip,
        is_self_normalize=cfg.is_self_normalize,
        is_apply_to=cfg.is_apply_to,
        reduction=cfg.reduction,
        document_ids=x.document_ids,
    )
    return policy_value_triple(out, x, extra)


ALGORITHM = Algorithm(
    name="dqo",
    loss=loss,
    needs_value=True,
    needs_reference=True,
    batch_mode="samples",
    config_keys=(
        "loss.beta",
        "loss.lam",
        "loss.is_level",
        "loss.is_clip",
        "loss.is_self_normalize",
        "loss.is_apply_to",
        "loss.truncated",
        "loss.reduction",
        "value.*",
    ),
    metrics=(
        "policy_loss",
        "value_loss",
        "value_mean",
        "td_error_abs_mean",
        "return_mean",
        "return_sq_mean",
        "advantage_mean",
        "advantage_sq_mean",
        "is_weight_mean",
        "is_weight_max",
        "is_truncated_frac",
        "kl_ref",
        "entropy_proxy",
        *VALUE_METRICS,
    ),
    summary="Direct Q-function Optimization: the policy as a soft Q-function, a value network, lambda-returns",
)
