"""Token log-probs fused with the output layer: from final hidden states and the output weight, chunk by
chunk, so the ``[s, b, V]`` logits never exist (the idea of Cut Cross-Entropy and NeMo-RL's fused
linear log-probs).

For a chunk of positions ``c`` with hidden states ``H_c`` (``[c, b, h]``) and this rank's vocab shard of
the output weight ``W`` (``[V/tp, h]``)::

    Z_c = H_c W^T                                   [c, b, V/tp]   (in the weight's dtype, like Megatron)
    log pi(y) = Z_c[y] - logsumexp(Z_c)             (fp32; all-reduced over TP, see `_math.py`)

Backward recomputes ``Z_c`` (or, when the whole sequence is one chunk, reuses what forward kept: the logits,
or without TP torch's fused ``log_softmax(Z)``) and, with ``G_c = g * (onehot(y) - softmax(Z_c))``::

    dH_c = G_c W          (partial over the vocab shard: summed over TP by the entry op, below)
    dW  += G_c^T H_c      (fp32 accumulation over chunks; or straight into ``W.main_grad``)

Peak extra memory: one chunk of fp32 logits (plus its cast for the matmul), the ``[s, b]`` log-probs
and logsumexp, ``dH`` and ``dW`` -- independent of the sequence length times vocabulary product. The
default chunk is sized so that one chunk of fp32 logits is about `DEFAULT_CHUNK_BYTES`, which keeps
the peak the same at 32k and 152k vocabularies.

Tensor and sequence parallelism (who gathers): this function does. The output layer needs the
whole sequence on every TP rank; with ``sequence_parallel=True`` `hidden` is this rank's
``[s/tp, b, h]`` slice and is all-gathered over `tp_group` (backward: all-reduce + slice, i.e.
reduce-scatter, because every rank's vocab shard contributes to dH); without SP `hidden` is the full
``[s, b, h]`` (replicated over TP) and dH is all-reduced over `tp_group`. This is what Megatron's
``ColumnParallelLinear`` does at its entry, so pass the decoder's output as it comes.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from dqo_megatron.logprobs._math import (
    chunk_bounds,
    compute_dtype,
    grad_of_logits,
    group_size,
    logsumexp_and_target,
    mask_padding,
    vocab_shard,
)
from dqo_megatron.logprobs.gather import copy_to_tensor_parallel, gather_from_sequence_parallel

DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Target size of one chunk of fp32 logits when `chunk_size` is None (128 MiB: ~220 positions of a
152k vocabulary at batch 1, ~1000 positions of 32k)."""


def auto_chunk_size(batch: int, local_vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Sequence positions per chunk so that ``batch * chunk * local_vocab * 4 bytes ~= chunk_bytes``."""
    return max(1, chunk_bytes // (4 * batch * local_vocab))


class _TokenLogprobsFromHidden(torch.autograd.Function):
    """hidden ``[s, b, h]`` (whole sequence), weight ``[V/tp, h]``, labels ``[s, b]`` -> ``[s, b]``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, group, chunk_size, into_main_grad, keep_logits=True, vocab_size=None):
        dtype = compute_dtype(weight.dtype)
        # A sequence that fits in one chunk keeps its logits for backward: the memory is the chunk
        # budget anyway, and it saves the recomputation (one of four vocabulary-sized matmuls).
        keep = keep_logits and labels.shape[0] <= chunk_size
        kept = []
        vocab_start, vocab_total = vocab_shard(weight.shape[0], group)
        valid = (labels >= 0) & (labels < (vocab_total if vocab_size is None else min(vocab_size, vocab_total)))
        out = torch.empty(labels.shape, dtype=dtype, device=hidden.device)
        lse = None  # stays None when `kept` holds log-probs (no TP, one chunk): backward needs no lse
        if keep and group_size(group) == 1:
            # One chunk, whole vocabulary: torch's fused log_softmax, kept for backward
            # (``softmax = exp(log_softmax)``): fewer passes over [s, b, V] than max/sub/exp/sum.
            z = torch.matmul(hidden.to(weight.dtype), weight.t()).to(dtype)
            logp = torch.log_softmax(mask_padding(z, vocab_start, vocab_size, owned=True), dim=-1)
            out.copy_(logp.gather(-1, labels.clamp(0, vocab_total - 1).unsqueeze(-1)).squeeze(-1))
            kept.append(logp)
        else:
            lse = torch.empty(labels.shape, dtype=dtype, device=hidden.device)
            for s0, s1 in chunk_bounds(labels.shape[0], chunk_size):
                z = torch.matmul(hidden[s0:s1].to(weight.dtype), weight.t()).to(dtype)  # fresh: ours to overwrite
                z = mask_padding(z, vocab_start, vocab_size, owned=True)
                chunk_lse, target = logsumexp_and_target(z, labels[s0:s1], vocab_start, group, owned=not keep)
                lse[s0:s1] = chunk_lse
                out[s0:s1] = target - chunk_lse
                if keep:
                    kept.append(z)
                del z  # else the next chunk's logits are allocated while these are still alive: 2 chunks
        out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, labels, lse, valid, *kept)
        ctx.group, ctx.chunk_size, ctx.vocab_start, ctx.into_main_grad = group, chunk_size, vocab_start, into_main_grad
        ctx.vocab_size = vocab_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse, valid, *kept = ctx.saved_tensors
        dtype = compute_dtype(weight.dtype)
        grad_out = torch.where(valid, grad_out.to(dtype), 0.0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:
            grad_w = (
                weight.main_grad if ctx.into_main_grad else torch.zeros(weight.shape, dtype=dtype, device=weight.device)
            )
        local_vocab, h = weight.shape
        for s0, s1 in chunk_bounds(labels.shape[0], ctx.chunk_size):
            h_c = hidden[s0:s1].to(weight.dtype)
            z = kept.pop() if kept else torch.matmul(h_c, weight.t()).to(dtype)
            z = mask_padding(z, ctx.vocab_start, ctx.vocab_size, owned=True)  # kept: already masked
            chunk_lse = None if lse is None else lse[s0:s1]  # None: z holds log-probs already
            g_z = grad_of_logits(z, labels[s0:s1], ctx.vocab_start, chunk_lse, grad_out[s0:s1], owned=True)
            if need_h:
                grad_h[s0:s1] = torch.matmul(g_z.to(weight.dtype), weight)
            if need_w:
                # addmm_ accumulates in place: no [V/tp, h] temporary per chunk.
                grad_w.addmm_(g_z.reshape(-1, local_vocab).t().to(grad_w.dtype), h_c.reshape(-1, h).to(grad_w.dtype))
            del z, g_z  # one chunk alive at a time (see forward)
        if need_w and ctx.into_main_grad:
            grad_w = _after_main_grad_accumulation(weight)
        elif need_w and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def _after_main_grad_accumulation(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """What to return for a weight whose gradient went straight into ``weight.main_grad``.

    Mirrors Megatron's ``gradient_accumulation_fusion`` in ``ColumnParallelLinear``: under Megatron DDP
    (which sets ``grad_added_to_main_grad``) return a dummy, never-written gradient so DDP's backward
    hook still fires (it needs to, with overlapped grad reduction) and flag that the gradient was
    already added; otherwise return None.
    """
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group=None,
    sequence_parallel: bool = False,
    chunk_size: Optional[int] = None,
    layout: Literal["sbh", "bsh"] = "sbh",
    accumulate_into_main_grad: bool = False,
    keep_logits: bool = True,
    vocab_size: Optional[int] = None,
) -> torch.Tensor:
    """``log pi(labels)`` from final hidden states and the (vocab-parallel) output weight, fused.

    Args:
        hidden: final hidden states (after the final norm). ``layout="sbh"`` (Megatron's decoder
            output): ``[s, b, h]``, or this rank's ``[s/tp, b, h]`` with `sequence_parallel`;
            ``layout="bsh"``: ``[b, s, h]`` (not with `sequence_parallel`).
        weight: output-layer weight ``[V/tp, h]``: this rank's vocab shard (rows ``[r*V/tp, (r+1)*V/tp)``),
            the full ``[V, h]`` without TP. See `output_weight` for a GPTModel's.
        labels: ``[b, s]`` token ids over the full vocabulary (whole sequence, also under SP); ids
            outside ``[0, V)`` give 0 and no gradient.
        tp_group: tensor-parallel group the vocabulary is split over (None: no TP).
        sequence_parallel: `hidden` is this rank's SP slice; it is all-gathered here.
        chunk_size: sequence positions per chunk; None: `auto_chunk_size` (one chunk of fp32 logits
            ~ `DEFAULT_CHUNK_BYTES`).
        accumulate_into_main_grad: add dW straight into ``weight.main_grad`` (Megatron DDP's fp32
            gradient buffer) instead of returning a ``[V/tp, h]`` gradient, as Megatron's
            gradient-accumulation fusion does; saves one ``[V/tp, h]`` temporary.
        keep_logits: when the whole sequence fits in one chunk, keep its logits for backward instead
            of recomputing them (memory: that one chunk, within the chunk budget; time: one matmul
            fewer). Longer sequences always recompute.
        vocab_size: the real vocabulary when the output layer is padded past it (Megatron's
            make_vocab_size_divisible_by): rows >= vocab_size are no tokens (no mass, no gradient).
            None: every row is a token.

    Returns:
        ``[b, s]`` fp32 (fp64 for an fp64 weight), identical on every TP rank:
        ``log pi(y_t) = (H W^T)_t[y_t] - logsumexp_j (H W^T)_t[j]``, the logits computed chunk by chunk
        in the weight's dtype and normalized in fp32. Differentiable w.r.t. `hidden` and `weight`.
    """
    if layout == "bsh":
        if sequence_parallel:
            raise ValueError("sequence_parallel hidden states come in Megatron's [s/tp, b, h] layout")
        hidden = hidden.transpose(0, 1)
    elif layout != "sbh":
        raise ValueError(f"layout must be 'sbh' or 'bsh', got {layout!r}")
    if group_size(tp_group) > 1:
        if sequence_parallel:
            hidden = gather_from_sequence_parallel(hidden, tp_group, dim=0, sum_grads=True)
        else:
            hidden = copy_to_tensor_parallel(hidden, tp_group)
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [s, b, h] and weight [V/tp, h], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[1], hidden.shape[0]):
        raise ValueError(
            f"labels {tuple(labels.shape)} do not match hidden states of {hidden.shape[0]} positions "
            f"x batch {hidden.shape[1]} (labels are [b, s] over the whole sequence)"
        )
    if accumulate_into_main_grad and getattr(weight, "main_grad", None) is None:
        raise ValueError("accumulate_into_main_grad needs weight.main_grad (Megatron DDP's gradient buffer)")
    if chunk_size is None:
        chunk_size = auto_chunk_size(hidden.shape[1], weight.shape[0])
    out = _TokenLogprobsFromHidden.apply(
        hidden, weight, labels.t().long(), tp_group, chunk_size, accumulate_into_main_grad, keep_logits, vocab_size
    )
    return out.t().contiguous()


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output-layer weight ``[V/tp, h]`` of a Megatron GPTModel (unwrapping DDP / Float16Module).

    With tied embeddings this is the shared embedding weight; only on the last pipeline stage.
    """
    from dqo_megatron.parallel import unwrap

    gpt = unwrap(model, lambda m: hasattr(m, "share_embeddings_and_output_weights"), "output layer")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight
