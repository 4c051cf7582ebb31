"""DRO (Direct Reward Optimization): the bandit version of DQO, one value per prompt
(docs/algorithms.md, "DRO")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple
from dqo_megatron.algorithms.value_based import VALUE_METRICS, policy_value_triple, value_inputs
from dqo_megatron.losses import dro_losses


def loss(x: LossInputs) -> LossTriple:
    """``policy_weight * policy_loss + value.loss_coef * value_loss`` of `dro_losses`. DRO has no
    per-token value to bootstrap from, so `loss.truncated: bootstrap` excludes truncated responses."""
    cfg = x.run.loss
    x, extra = value_inputs(x, "exclude" if cfg.truncated == "bootstrap" else cfg.truncated)
    out = dro_losses(x.logp, x.ref, x.values, x.rewards, x.mask, beta=cfg.beta, document_ids=x.document_ids)
    return policy_value_triple(out, x, extra)


ALGORITHM = Algorithm(
    name="dro",
    loss=loss,
    needs_value=True,
    needs_reference=True,
    batch_mode="samples",
    config_keys=("loss.beta", "loss.truncated", "value.*"),
    metrics=(
        "policy_loss",
        "value_loss",
        "value_mean",
        "reward_mean",
        "log_ratio_mean",
        "kl_ref",
        "entropy_proxy",
        *VALUE_METRICS,
    ),
    summary="Direct Reward Optimization: one value per prompt, the whole response as one action",
)
