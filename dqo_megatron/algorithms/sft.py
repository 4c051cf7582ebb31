"""SFT: the negative log-likelihood of the dataset's responses (docs/algorithms.md, "SFT")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple, loss_triple
from dqo_megatron.losses import sft_loss


def loss(x: LossInputs) -> LossTriple:
    """`sft_loss` on every response."""
    return loss_triple(sft_loss(x.logp, x.mask, reduction=x.run.loss.reduction, document_ids=x.document_ids))


ALGORITHM = Algorithm(
    name="sft",
    loss=loss,
    batch_mode="samples",
    config_keys=("loss.reduction",),
    metrics=("nll",),
    summary="supervised fine-tuning: the negative log-likelihood of the responses",
)
