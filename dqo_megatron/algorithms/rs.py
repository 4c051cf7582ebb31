"""Rejection sampling: SFT on the sampled responses that earned reward 1 (docs/algorithms.md, "SFT")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple, loss_triple
from dqo_megatron.losses import rejection_sampling_loss


def loss(x: LossInputs) -> LossTriple:
    """`rejection_sampling_loss`: the NLL of the responses whose reward sum reaches 1."""
    return loss_triple(
        rejection_sampling_loss(x.logp, x.rewards, x.mask, reduction=x.run.loss.reduction, document_ids=x.document_ids)
    )


ALGORITHM = Algorithm(
    name="rs",
    loss=loss,
    batch_mode="samples",
    config_keys=("loss.reduction",),
    metrics=("nll", "accepted_frac"),
    summary="rejection sampling: the negative log-likelihood of the correct sampled responses",
)
