"""DPO on (correct, incorrect) pairs of the same prompt (docs/algorithms.md, "DPO")."""

from __future__ import annotations

from dqo_megatron.algorithms.base import Algorithm, LossInputs, LossTriple, loss_triple
from dqo_megatron.losses import dpo_loss, sequence_logprobs


def loss(x: LossInputs) -> LossTriple:
    """`dpo_loss` on rows [0, B) chosen and [B, 2B) rejected (batch mode ``pairs``)."""
    policy_seq, ref_seq = sequence_logprobs(x.logp, x.mask), sequence_logprobs(x.ref, x.mask)
    half = policy_seq.shape[0] // 2
    return loss_triple(
        dpo_loss(policy_seq[:half], ref_seq[:half], policy_seq[half:], ref_seq[half:], beta=x.run.loss.beta)
    )


ALGORITHM = Algorithm(
    name="dpo",
    loss=loss,
    needs_reference=True,
    batch_mode="pairs",
    config_keys=("loss.beta", "loss.dpo_max_pairs_per_prompt"),
    metrics=("dpo_loss", "reward_accuracy", "reward_margin_mean", "chosen_reward_mean", "rejected_reward_mean"),
    summary="Direct Preference Optimization on (correct, incorrect) pairs of a prompt",
)
