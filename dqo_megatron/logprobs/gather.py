"""Move per-token tensors between "this rank's part of the sequence" and "the whole sequence".

Lambda-returns run backwards over whole sequences, but under sequence parallelism (SP) and context
parallelism (CP) a rank only holds part of each sequence:

* SP (over the TP group): hidden states are ``[s/tp, b, h]``; rank r holds the contiguous positions
  ``[r*s/tp, (r+1)*s/tp)``.
* CP (load-balanced, Megatron's layout): the sequence is cut into ``2*cp`` equal chunks and rank r holds
  chunks ``r`` and ``2*cp-1-r`` (`dqo_megatron.parallel.cp_local_positions`), so every rank
  does a similar share of causal attention.

Gradients: a gather's adjoint is "add up the gradients every rank sends to my piece, keep my piece".
How many ranks send a (non-zero) gradient depends on who computes the loss:

* CP ranks act like data-parallel ranks in Megatron: gradients are summed over the DP x CP group and
  divided by the token count summed over that group. `gather_from_context_parallel` therefore
  all-reduces the gradient and slices (gloo has no reduce-scatter). Two consistent ways to use it:
  (a) each CP rank computes the loss only on its own positions (cut the whole-sequence per-token loss
  with `split_for_context_parallel`) and counts only those tokens -- recommended; or (b) every CP rank
  computes the loss on the whole sequence and counts all its tokens: gradients and counts are then
  both cp times larger and Megatron's division cancels it. Mixing (b)'s loss with (a)'s count is wrong.
* TP ranks are not data-parallel: a loss computed redundantly on every TP rank is one loss. So
  `gather_from_sequence_parallel` by default only slices the gradient (every TP rank already holds the
  full gradient); parameters that see a slice of the sequence (e.g. a value head under SP) are marked
  ``sequence_parallel`` and Megatron all-reduces their gradients over TP in `finalize_model_grads`.
  Use ``sum_grads=True`` when each TP rank contributes a different part of the gradient (e.g. the
  hidden states feeding a vocab-parallel output layer, as in `token_logprobs_from_hidden`).

Groups default to Megatron's TP / CP groups (imported lazily; the functions also work on any
process group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dqo_megatron.logprobs._math import group_rank, group_size


def _default_group(kind: str):
    from megatron.core import parallel_state

    if kind == "tp":
        return parallel_state.get_tensor_model_parallel_group()
    return parallel_state.get_context_parallel_group()


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's tensor along `dim` in rank order; backward (optionally all-reduce,) slice."""

    @staticmethod
    def forward(ctx, x, group, dim, sum_grads):
        ctx.group, ctx.dim, ctx.sum_grads, ctx.local = group, dim, sum_grads, x.shape[dim]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_grads:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.group)
        mine = grad.narrow(ctx.dim, group_rank(ctx.group) * ctx.local, ctx.local)
        return mine.contiguous(), None, None, None


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce(SUM) of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def copy_to_tensor_parallel(x: torch.Tensor, tp_group) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient over `tp_group` in backward.

    The entry of a vocab-parallel computation on an input replicated over TP (Megatron's
    ``copy_to_tensor_model_parallel_region``): each rank's vocab shard contributes part of dL/dx.
    """
    if group_size(tp_group) == 1:
        return x
    return _AllReduceGrad.apply(x, tp_group)


def gather_from_sequence_parallel(
    x: torch.Tensor, tp_group=None, *, dim: int = 0, sum_grads: bool = False
) -> torch.Tensor:
    """The whole sequence from this rank's contiguous SP slice, on every TP rank.

    Args:
        x: this rank's slice, e.g. hidden ``[s/tp, b, h]`` (``dim=0``) or per-token values
            ``[b, s/tp]`` (``dim=1``).
        tp_group: defaults to Megatron's tensor-parallel group.
        dim: the sequence dimension.
        sum_grads: False (default): backward keeps this rank's slice of the gradient, right when the
            loss downstream is computed identically on every TP rank. True: backward all-reduces then
            slices (a reduce-scatter), right when each TP rank sends a different partial gradient.

    Returns:
        ``x`` concatenated over the TP ranks along `dim` (``s/tp -> s``).
    """
    tp_group = _default_group("tp") if tp_group is None else tp_group
    if group_size(tp_group) == 1:
        return x
    return _AllGather.apply(x, tp_group, dim, sum_grads)


def _cp_order(local_len: int, cp: int, device) -> torch.Tensor:
    """For the rank-major concatenation of all CP ranks' parts: the global position of each entry."""
    from dqo_megatron.parallel import cp_local_positions

    if local_len % 2:
        raise ValueError(f"under CP each rank holds two equal chunks; local length {local_len} is odd")
    return torch.cat([cp_local_positions(local_len, cp, r, device) for r in range(cp)])


def gather_from_context_parallel(x: torch.Tensor, cp_group=None, *, dim: int = 1) -> torch.Tensor:
    """Whole sequences in natural order from each CP rank's load-balanced part, on every CP rank.

    Args:
        x: this rank's part along `dim`, e.g. log-probs or values ``[b, s/cp]`` holding global
            positions ``cp_local_positions(s/cp, cp, rank)`` (chunks r and 2*cp-1-r of 2*cp).
        cp_group: defaults to Megatron's context-parallel group.
        dim: the sequence dimension.

    Returns:
        ``[..., s, ...]`` with ``out[..., p, ...]`` the value at global position p. Backward:
        all-reduce over the CP group, then this rank's positions (see the module docstring for the
        matching loss/count convention).
    """
    cp_group = _default_group("cp") if cp_group is None else cp_group
    cp = group_size(cp_group)
    if cp == 1:
        return x
    gathered = _AllGather.apply(x, cp_group, dim, True)
    order = _cp_order(x.shape[dim], cp, x.device)  # gathered[k] holds global position order[k]
    return gathered.index_select(dim, torch.argsort(order))


def split_for_context_parallel(x: torch.Tensor, cp_group=None, *, dim: int = 1) -> torch.Tensor:
    """This CP rank's load-balanced part of a whole-sequence tensor (inverse of the gather).

    ``x[..., s, ...] -> x[..., cp_local_positions(s/cp, cp, rank), ...]``; the gradient flows back into
    those positions only (zeros elsewhere), no communication.
    """
    cp_group = _default_group("cp") if cp_group is None else cp_group
    cp = group_size(cp_group)
    if cp == 1:
        return x
    from dqo_megatron.parallel import cp_local_positions

    length = x.shape[dim]
    if length % (2 * cp):
        raise ValueError(f"sequence length {length} is not a multiple of 2*cp={2 * cp}")
    return x.index_select(dim, cp_local_positions(length // cp, cp, group_rank(cp_group), x.device))


def gather_per_token(
    x: torch.Tensor,
    *,
    sequence_parallel: bool = False,
    tp_group=None,
    cp_group=None,
    dim: int = 1,
) -> torch.Tensor:
    """Per-token scalars ``[b, s_local]`` from a rank's SP and/or CP part to ``[b, s]`` in natural order.

    SP first (the TP ranks' contiguous slices make up this CP rank's part), then CP. Use it for values
    read from SP hidden states ``[s/(tp*cp), b, h]``; log-probs from `token_logprobs_from_hidden` are
    already whole along TP and need only the CP step.
    """
    if sequence_parallel:
        x = gather_from_sequence_parallel(x, tp_group, dim=dim)
    return gather_from_context_parallel(x, cp_group, dim=dim)
