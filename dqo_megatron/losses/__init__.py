"""Pure-tensor DQO math and the paper's baselines (no megatron import; usable from any trainer).

    from dqo_megatron.losses import lambda_returns, dqo_losses

    out = dqo_losses(logprobs, ref_logprobs, behavior_logprobs, values, rewards, response_mask,
                     beta=0.1, lam=1.0)
    out.policy_loss, out.value_loss           # means over this batch
    loss_sum, count, metrics = out.loss_func_output()   # Megatron's loss_func contract

Tensors are `[batch, seq]`, aligned per response position: index h holds `log pi(a_h|s_h)`, `V(s_h)`
and `r_h`; a 0/1 `response_mask` marks the response tokens, optional integer `document_ids` separate
packed documents. The math is explained in `dqo.py`; the baselines in `baselines.py`.
"""

from dqo_megatron.losses.baselines import (
    dpo_loss,
    dro_losses,
    kto_loss,
    preference_pairs,
    rejection_sampling_loss,
    sequence_logprobs,
    sft_loss,
)
from dqo_megatron.losses.common import LossOutput, PolicyValueLossOutput
from dqo_megatron.losses.dqo import (
    IS_LEVELS,
    ImportanceWeights,
    dqo_losses,
    lambda_returns,
    truncated_importance_weights,
)
from dqo_megatron.losses.segments import document_ids_from_cu_seqlens

__all__ = [
    "IS_LEVELS",
    "ImportanceWeights",
    "LossOutput",
    "PolicyValueLossOutput",
    "document_ids_from_cu_seqlens",
    "dpo_loss",
    "dqo_losses",
    "dro_losses",
    "kto_loss",
    "lambda_returns",
    "preference_pairs",
    "rejection_sampling_loss",
    "sequence_logprobs",
    "sft_loss",
    "truncated_importance_weights",
]
