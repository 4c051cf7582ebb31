"""forward_step / loss_func for DQO and the baselines, on Megatron's contract.

A micro-batch is a dict of ``[b, s]`` tensors aligned per position h (the model reads `tokens[h]`
and predicts `labels[h] = tokens[h+1]`, so index h holds log pi(a_h|s_h), V(s_h) and r_h):

    tokens, labels, position_ids      model inputs
    response_mask                     1 where labels[h] is a response token
    rewards                           r_h (outcome on the last response token, process rewards inside)
    behavior_logprobs   (optional)    log mu(a_h|s_h) of the sampler; absent = the reference's
    ref_logprobs        (optional)    precomputed log pi_ref(a_h|s_h); absent = the reference model's
    document_ids        (optional)    rows holding several documents: a different id per document
                                      (passed to the losses as is; `train.packing` never sets it, below)

A packed micro-batch (`training/packing.py`) holds tokens, labels, position_ids and
attention_document_ids as packed rows ``[R, s]`` and every other key as one row per document
``[N, s]``, with `unpack_index`: the model runs on the packed rows, the loss on the document rows.

`rl_forward_step` runs the `PolicyValueModel` on this context-parallel rank's part of the sequence;
`rl_loss_func` gathers the per-token outputs into whole sequences (the lambda-returns run backwards
over a whole response) and calls the loss of the registered algorithm (`dqo_megatron.algorithms`,
one object per algorithm, on the pure losses of `dqo_megatron.losses`). Every CP rank then
computes the loss of the whole sequence and counts all its tokens: Megatron sums gradients and
token counts over the DP x CP group, so both are cp times larger and the division cancels
(see `dqo_megatron.logprobs.gather`).
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from dqo_megatron import algorithms
from dqo_megatron.algorithms import LossInputs
from dqo_megatron.config import RunConfig
from dqo_megatron.logprobs import gather_from_context_parallel
from dqo_megatron.losses.common import ratio_metric
from dqo_megatron.training.packing import unpack_rows
from dqo_megatron.training.policy_value import LOGP, REF_LOGP, VALUE
from dqo_megatron.training.step import model_inputs


def rl_forward_step(
    run: RunConfig, data_iterator: Iterator[dict], model: torch.nn.Module, *, policy_weight: float = 1.0
):
    """Forward one micro-batch; returns ``(per-token outputs, partial(rl_loss_func, run, batch))``.

    `policy_weight` multiplies the policy's loss (0 during the critic warm-up, `value.warmup_steps`).
    """
    batch = next(data_iterator)
    inputs = model_inputs(batch)
    packed = batch.get("attention_document_ids")  # whole rows: every CP rank masks from the same ids
    output = model(inputs["tokens"], inputs["position_ids"], inputs["labels"], packed)
    return output, partial(rl_loss_func, run, batch, policy_weight=policy_weight)


def rl_loss_func(run: RunConfig, batch: dict, output: torch.Tensor, *, policy_weight: float = 1.0):
    """``(loss_sum, count, metrics)`` of `run.algorithm` for one micro-batch: the registered
    `Algorithm.loss` (`dqo_megatron.algorithms`) on the whole sequences, plus the metric ``loss``.

    output: ``[b, s_local, 3]`` from `PolicyValueModel` (log pi, V, log pi_ref) on this CP rank.
    For DQO and DRO the summed loss is ``policy_weight * policy_loss + value.loss_coef * value_loss``.
    """
    algorithm = algorithms.get(run.algorithm)
    output = gather_from_context_parallel(output, dim=1)
    layout = input_layout_metrics(output.shape[0], output.shape[1], batch)
    if "unpack_index" in batch:  # packed rows: back to one row per document, as the loss keys are
        output = unpack_rows(output, batch["unpack_index"])
    logp, values = output[..., LOGP], output[..., VALUE]
    ref = batch.get("ref_logprobs")
    if ref is None:
        ref = output[..., REF_LOGP].detach()
        if algorithm.needs_reference and torch.isnan(ref).any():
            raise ValueError(
                f"algorithm={run.algorithm} needs reference log-probs: the batch has no "
                "'ref_logprobs' and the run holds no reference model"
            )
    behavior = batch.get("behavior_logprobs")
    if behavior is not None:  # documents without sampler log-probs were sampled from the reference
        behavior = torch.where(torch.isnan(behavior), ref, behavior)
    inputs = LossInputs(
        run=run,
        batch=batch,
        logp=logp,
        values=values,
        ref=ref,
        behavior=behavior,
        mask=batch["response_mask"],
        rewards=batch["rewards"],
        document_ids=batch.get("document_ids"),
        policy_weight=policy_weight,
    )
    loss_sum, count, metrics = algorithm.loss(inputs)
    metrics = {**metrics, **layout}
    metrics["loss"] = torch.stack([loss_sum.detach().float(), count.float()])
    return loss_sum, count, metrics


def input_layout_metrics(rows: int, seq_length: int, batch: dict) -> dict[str, torch.Tensor]:
    """What the model computed for this micro-batch besides the documents, as Megatron metrics
    (``[numerator, denominator]``, reduced over micro-batches and ranks):

    rows_per_document: model rows (packed, or under pipeline parallelism padded to a fixed count) per
        document row of the loss (1 unpacked); the logger scales the step's FLOPs by it.
    padding_frac: share of the rows' input positions that hold no document token (`input_tokens`).
    """
    device = batch["response_mask"].device
    positions = torch.tensor(float(rows * seq_length), device=device)
    out = {"rows_per_document": ratio_metric(torch.tensor(float(rows), device=device), batch["response_mask"].shape[0])}
    if "input_tokens" in batch:
        out["padding_frac"] = ratio_metric(positions - batch["input_tokens"].sum().to(positions.dtype), positions)
    return out


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
