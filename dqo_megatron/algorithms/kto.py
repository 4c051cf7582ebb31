"""KTO: desirable (correct) and undesirable responses against a KL reference point estimated on
mismatched prompt/response rows (docs/algorithms.md, "KTO")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple, loss_triple
from dqo_megatron.losses import kto_loss, sequence_logprobs


def loss(x: LossInputs) -> LossTriple:
    """`kto_loss` on rows [0, B) the documents and [B, 2B) the mismatched rows (batch mode ``kto``); a
    micro-batch by tokens also carries `kl_group` [B] (each document's padded micro-batch: z0 per group)."""
    cfg = x.run.loss
    policy_seq, ref_seq = sequence_logprobs(x.logp, x.mask), sequence_logprobs(x.ref, x.mask)
    half = policy_seq.shape[0] // 2
    desirable = x.batch["desirable"].to(x.logp.device).bool()
    return loss_triple(
        kto_loss(
            policy_seq[:half],
            ref_seq[:half],
            desirable,
            policy_seq[half:],
            ref_seq[half:],
            beta=cfg.beta,
            desirable_weight=cfg.kto_desirable_weight,
            undesirable_weight=cfg.kto_undesirable_weight,
            kl_groups=x.batch.get("kl_group"),
        )
    )


ALGORITHM = Algorithm(
    name="kto",
    loss=loss,
    needs_reference=True,
    reference_from_data=False,
    batch_mode="kto",
    config_keys=("loss.beta", "loss.kto_desirable_weight", "loss.kto_undesirable_weight"),
    metrics=("kto_loss", "kl_reference", "desirable_reward_mean", "undesirable_reward_mean"),
    summary="Kahneman-Tversky Optimization: desirable / undesirable responses, no pairs",
)
