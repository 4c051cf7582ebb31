"""One optimizer step on Megatron's terms, and the language-model forward step used by SFT and tests.

The contract (Megatron-Core's): `forward_step(data_iterator, model)` returns
`(output, partial(loss_func, batch))`, and `loss_func` returns `(loss_sum, token_count, metrics)`.
With `calculate_per_token_loss=True` Megatron's schedule sums token counts over micro-batches,
`finalize_model_grads` all-reduces them over data- and context-parallel ranks and divides the
gradients once by the global count. So the step is exactly the global token mean, whatever the
split into micro-batches, DP, CP or PP ranks; we never divide inside a micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import torch


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    """Global token-mean loss of the step (over all micro-batches and DP/CP ranks)."""
    tokens: int
    """Tokens that carried loss in the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    update_successful: bool
    """False when the step was not applied (NaN/inf loss, or the optimizer skipped it)."""
    metrics: dict = field(default_factory=dict)
    """Every metric of the loss function, reduced over micro-batches and ranks (numerator/denominator)."""
    grad_norms: dict = field(default_factory=dict)
    """Per-member gradient norms before clipping ({"policy": n, "value": n}) with per-member clipping."""
    document_tokens: int = 0
    """Input positions the step's documents filled, over all data-parallel ranks (what throughput
    counts: `tokens` is the loss's count, sequences for sequence-level losses); 0 when not measured."""


def lm_loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked token-sum of the language-model loss.

    loss_mask, per_token_loss: ``[batch, seq]`` (per_token_loss = -log pi(label), from the model).
    Returns ``(loss_sum, token_count, {"lm loss": [loss_sum, token_count]})`` (Megatron's contract).
    """
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}


def lm_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """Forward one micro-batch of ``{"tokens", "labels", "loss_mask", "position_ids"}`` (``[b, s]``).

    Under context parallelism the batch is first cut to this rank's load-balanced chunks.
    Returns ``(per_token_loss [b, s_local], partial(lm_loss_func, loss_mask))`` on the last stage.
    """
    batch = next(data_iterator)
    batch = slice_batch_for_context_parallel(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


def microbatch_iterators(chunks: Sequence[torch.nn.Module], microbatches: list[dict]):
    """What Megatron's schedules take as `data_iterator`: one iterator, or one per model chunk under
    virtual pipeline parallelism (every chunk reads the same micro-batches)."""
    if len(chunks) == 1:
        return iter(microbatches)
    return [iter(list(microbatches)) for _ in chunks]


def model_inputs(batch: dict) -> dict:
    """tokens, position_ids, labels of a ``[b, s]`` micro-batch, cut to this context-parallel rank."""
    return slice_batch_for_context_parallel({k: batch[k] for k in ("tokens", "position_ids", "labels")})


def slice_batch_for_context_parallel(batch: dict) -> dict:
    """This CP rank's part of every ``[b, s]`` tensor (chunks r and 2*cp-1-r of 2*cp); identity at CP=1."""
    from megatron.core import parallel_state

    from dqo_megatron.compat.megatron_api import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch), cp_group=parallel_state.get_context_parallel_group())


def train_step(
    ddp_chunks: Sequence[torch.nn.Module],
    optimizer,
    data_iterator: Iterator[dict] | list[Iterator[dict]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = lm_forward_step,
    metric_key: str = "lm loss",
    skip_nonfinite: bool = True,
    member_clips: dict[str, float] | None = None,
) -> StepResult:
    """Zero grads, run Megatron's forward/backward schedule over the micro-batches, step.

    `data_iterator` yields micro-batches for this data-parallel rank (a list of iterators, one per
    chunk, under virtual pipeline parallelism). `forward_step`'s metrics must include `metric_key`
    as ``[loss_sum, token_count]``; every metric is reduced the same way into `StepResult.metrics`.
    With `skip_nonfinite`, a step whose global loss is NaN/inf is not applied
    (``update_successful=False``): the weights stay as they were. `member_clips` ({"policy": c,
    "value": c}): clip each member's gradient by its own norm (`member_step.member_clipped_step`)
    instead of Megatron's one global clip; the norms land in `StepResult.grad_norms`.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=list(ddp_chunks),
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    totals = reduce_metrics(losses)
    loss_sum, tokens = totals.get(metric_key, (float("nan"), 0.0))
    loss = loss_sum / max(tokens, 1)
    if skip_nonfinite and not math.isfinite(loss):
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        update_successful, grad_norm, grad_norms = False, float("nan"), {}
    elif member_clips is not None:
        from dqo_megatron.training.member_step import member_clipped_step

        update_successful, grad_norm, grad_norms = member_clipped_step(optimizer, member_clips)
    else:
        (update_successful, grad_norm, _), grad_norms = optimizer.step(), {}
    return StepResult(
        loss=loss,
        tokens=int(tokens),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=bool(update_successful),
        metrics={k: num / den if den else float("nan") for k, (num, den) in totals.items()},
        grad_norms=grad_norms,
    )


def reduce_metrics(losses: list[dict]) -> dict[str, tuple[float, float]]:
    """Sum every ``[numerator, denominator]`` metric over micro-batches and DP/CP ranks, shared from the
    last pipeline stage. Returns ``{name: (numerator, denominator)}``, the same on every rank.

    Every rank must call it (collective). Names come from the last stage and are broadcast.
    """
    from megatron.core import parallel_state

    names = sorted({k for item in losses for k in item})
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [names if parallel_state.is_pipeline_last_stage() else None]
        last = torch.distributed.get_process_group_ranks(pp_group)[-1]
        torch.distributed.broadcast_object_list(holder, src=last, group=pp_group)
        names = holder[0]
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for item in losses:
        for i, name in enumerate(names):
            totals[i] += item[name].detach().double().cpu().view(2)
    from dqo_megatron.parallel import device_for_this_process

    totals = totals.to(device_for_this_process())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # Only the last pipeline stage computed a loss; the others hold zeros: a sum shares it.
    torch.distributed.all_reduce(totals, group=pp_group)
    return {name: (float(totals[i, 0]), float(totals[i, 1])) for i, name in enumerate(names)}
