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


def rl_forward_step(run: RunConfig, data_iterator: Iterator[dict], model: torch.nn.Module):
    """Forward one micro-batch; returns ``(per-token outputs, partial(rl_loss_func, run, batch))``."""
    batch = next(data_iterator)
    inputs = model_inputs(batch)
    output = model(inputs["tokens"], inputs["position_ids"], inputs["labels"])
    return output, partial(rl_loss_func, run, batch)


def rl_loss_func(run: RunConfig, batch: dict, output: torch.Tensor):
    """``(loss_sum, count, metrics)`` of `run.algorithm` for one micro-batch.

    output: ``[b, s_local, 3]`` from `PolicyValueModel` (log pi, V, log pi_ref) on this CP rank.
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
    loss = run.loss
    if run.algorithm == "dqo":
        out = dqo_losses(logp, ref, behavior, values, rewards, mask, beta=loss.beta,
                         lam=loss.lam, is_level=loss.is_level, is_clip=loss.is_clip,
                         is_self_normalize=loss.is_self_normalize, reduction=loss.reduction, document_ids=docs)  # fmt: skip
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
    metrics = dict(metrics)
    metrics["loss"] = torch.stack([loss_sum.detach().float(), count.float()])
    return loss_sum, count, metrics
