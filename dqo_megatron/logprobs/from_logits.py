"""Token log-probs ``log pi(label)`` from (vocab-parallel) logits, optionally chunked along the sequence.

    log pi(y_t) = z_t[y_t] - logsumexp_j z_t[j]

computed in fp32 (fp64 for fp64 logits) whatever the logits' dtype, without touching the input.
Under tensor parallelism each rank holds a contiguous vocab shard ``[b, s, V/tp]`` (Megatron's
vocab-parallel output layer) and the max, the sum of exponentials and the target logit are
all-reduced over the TP group (see `_math.py`).

Memory. A naive ``log_softmax(logits.float()).gather(...)`` keeps an fp32 ``[b, s, V]`` log-softmax for
backward and builds two more of that size in backward. Here the forward keeps only the per-token
logsumexp ``[b, s]`` and the backward recomputes the softmax chunk by chunk, so beyond the logits and
their gradient (which the caller's graph owns anyway) the peak is one chunk of fp32 logits:
``b * chunk_size * V/tp * 4`` bytes (for bf16 logits the chunk's fp32 copy is that buffer: the
max-shift and exp are then done in place on it; fp32 logits are never written to).
"""

from __future__ import annotations

from typing import Optional

import torch

from dqo_megatron.logprobs._math import (
    chunk_bounds,
    compute_dtype,
    grad_of_logits,
    logsumexp_and_target,
    mask_padding,
    vocab_shard,
)


class _TokenLogprobsFromLogits(torch.autograd.Function):
    """logits ``[b, s, V/tp]``, labels ``[b, s]`` -> ``[b, s]``; backward recomputes per chunk."""

    @staticmethod
    def forward(ctx, logits, labels, group, chunk_size, vocab_size=None):
        dtype = compute_dtype(logits.dtype)
        vocab_start, vocab_total = vocab_shard(logits.shape[-1], group)
        valid = (labels >= 0) & (labels < (vocab_total if vocab_size is None else min(vocab_size, vocab_total)))
        lse = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        out = torch.empty(labels.shape, dtype=dtype, device=logits.device)
        for s0, s1 in chunk_bounds(labels.shape[1], chunk_size):
            piece = logits[:, s0:s1]
            z = mask_padding(piece.to(dtype), vocab_start, vocab_size, owned=piece.dtype != dtype)
            chunk_lse, target = logsumexp_and_target(z, labels[:, s0:s1], vocab_start, group, owned=z is not piece)
            lse[:, s0:s1] = chunk_lse
            out[:, s0:s1] = target - chunk_lse
            del z  # free this chunk before the next one is allocated
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, labels, lse, valid)
        ctx.group, ctx.chunk_size, ctx.vocab_start, ctx.vocab_size = group, chunk_size, vocab_start, vocab_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels, lse, valid = ctx.saved_tensors
        dtype = lse.dtype
        grad_out = torch.where(valid, grad_out.to(dtype), 0.0)
        grad = torch.empty_like(logits)
        for s0, s1 in chunk_bounds(labels.shape[1], ctx.chunk_size):
            piece = logits[:, s0:s1]
            z = mask_padding(piece.to(dtype), ctx.vocab_start, ctx.vocab_size, owned=piece.dtype != dtype)
            grad[:, s0:s1] = grad_of_logits(
                z, labels[:, s0:s1], ctx.vocab_start, lse[:, s0:s1], grad_out[:, s0:s1], owned=z is not piece
            )
            del z
        return grad, None, None, None, None


def token_logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """``log pi(labels)`` from full or vocab-parallel logits.

    Args:
        logits: ``[b, s, V]``, or this rank's vocab shard ``[b, s, V/tp]`` (rank r holds ids
            ``[r*V/tp, (r+1)*V/tp)``, Megatron's layout) when `tp_group` has more than one rank.
            Any float dtype; never modified.
        labels: ``[b, s]`` integer token ids over the full vocabulary. Ids outside ``[0, V)`` (e.g.
            -100 on padding) give log-prob 0 and no gradient.
        tp_group: the tensor-parallel process group the vocabulary is split over; None (or a group of
            one rank) means `logits` hold the full vocabulary.
        chunk_size: sequence positions per chunk (each chunk holds ``b * chunk_size`` tokens); None
            processes the whole sequence at once. Each token is computed on its own, so the result does
            not depend on the chunking (beyond float rounding).
        vocab_size: the real vocabulary when the logits are padded past it (Megatron's
            make_vocab_size_divisible_by): ids >= vocab_size are no tokens (no mass, no gradient; their
            labels give 0). None: every column is a token.

    Returns:
        ``[b, s]`` in fp32 (fp64 for fp64 logits), identical on every TP rank:
        ``log pi(y) = z_y - max(z) - log sum_j exp(z_j - max(z))``. Differentiable w.r.t. `logits`
        with ``d/dz_j = [j == y] - softmax(z)_j``; the gradient has the logits' dtype.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [b, s, V] and labels [b, s], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    return _TokenLogprobsFromLogits.apply(logits, labels.long(), tp_group, chunk_size, vocab_size)
