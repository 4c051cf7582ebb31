"""The per-chunk arithmetic shared by the from-logits and from-hidden paths.

For one token with logits ``z`` over the vocabulary ``V`` and label ``y``::

    log pi(y) = z_y - logsumexp(z) = z_y - m - log sum_j exp(z_j - m),   m = max_j z_j
    d log pi(y) / d z_j = [j == y] - softmax(z)_j

Under tensor (vocab) parallelism rank ``r`` holds the contiguous shard ``z[r*V/tp : (r+1)*V/tp]``, so
``m`` is an all-reduce(MAX) of the local maxima, ``sum_j exp(z_j - m)`` an all-reduce(SUM) of local
sums, and ``z_y`` an all-reduce(SUM) of "my shard's z_y, or 0 when y is not in my shard". Sum-exp and
the target logit travel in one all-reduce. The backward needs no communication: the upstream gradient
of ``log pi`` is the same on every TP rank (the loss is computed redundantly there) and each rank
writes ``g * ([j == y] - exp(z_j - lse))`` for its own shard only; the global ``lse`` was saved.

Labels outside ``[0, V)`` (e.g. -100 on padding) get log-prob 0 and zero gradient.

Megatron pads the output layer to ``V' >= V`` rows (a multiple of make_vocab_size_divisible_by x TP);
the rows past the real vocabulary are not tokens. Given the real ``V`` (`vocab_size`), their logits are
set to -inf before anything else (`mask_padding`), so they carry no probability mass and no gradient:
log pi then equals the unpadded model's (HF's), whatever the padding.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.distributed as dist


def group_size(group) -> int:
    """World size of `group`; 1 for None (no parallelism)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's rank in `group`; 0 for None."""
    return 0 if group is None else dist.get_rank(group)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (so tests can compare at fp64 precision)."""
    return torch.promote_types(dtype, torch.float32)


def vocab_shard(local_vocab: int, group) -> tuple[int, int]:
    """``(first id of this rank's shard, full vocabulary size)`` for Megatron's equal contiguous shards."""
    tp = group_size(group)
    return group_rank(group) * local_vocab, local_vocab * tp


def chunk_bounds(length: int, chunk_size: Optional[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of at most `chunk_size` (None: one chunk) covering ``length``."""
    if chunk_size is None or chunk_size >= length:
        yield 0, length
        return
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    for start in range(0, length, chunk_size):
        yield start, min(start + chunk_size, length)


def mask_padding(z: torch.Tensor, vocab_start: int, vocab_size: Optional[int], *, owned: bool) -> torch.Tensor:
    """`z` ``[..., V'/tp]`` (this rank's shard from `vocab_start`) with the columns of ids >= `vocab_size`
    set to -inf; in place when `owned`, else on a copy (only when there is padding in this shard)."""
    if vocab_size is None or vocab_start + z.shape[-1] <= vocab_size:
        return z
    z = z if owned else z.clone()
    z[..., max(vocab_size - vocab_start, 0) :] = float("-inf")
    return z


def _local_targets(labels: torch.Tensor, vocab_start: int, local_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), in_shard


def logsumexp_and_target(
    z: torch.Tensor, labels: torch.Tensor, vocab_start: int, group, *, owned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``logsumexp(z)`` and target logit ``z_y`` over a (possibly vocab-parallel) chunk.

    z: ``[..., V/tp]`` in the compute dtype; labels: ``[...]`` int64 global ids. Returns two ``[...]``
    tensors, identical on every rank of `group`. `owned` says z is a temporary we may overwrite; when
    it is a view of the caller's logits we allocate one temporary instead (the input is never mutated).
    """
    idx, in_shard = _local_targets(labels, vocab_start, z.shape[-1])
    target = torch.where(in_shard, z.gather(-1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
    m = z.amax(dim=-1)
    if group_size(group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = z.sub_(m.unsqueeze(-1)) if owned else z - m.unsqueeze(-1)
    sumexp = shifted.exp_().sum(dim=-1)
    if group_size(group) > 1:
        both = torch.stack([sumexp, target])
        dist.all_reduce(both, group=group)
        sumexp, target = both[0], both[1]
    return m + sumexp.log(), target


def grad_of_logits(
    z: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    lse: Optional[torch.Tensor],
    grad_out: torch.Tensor,
    *,
    owned: bool,
) -> torch.Tensor:
    """``grad_out * ([j == y] - exp(z_j - lse))`` on this rank's shard: ``[..., V/tp]``, compute dtype.

    ``lse=None``: `z` already holds log-probs (``z - lse``). `grad_out` must already be 0 where the
    label is invalid. Overwrites z when `owned`.
    """
    if lse is None:
        probs = z.exp_() if owned else z.exp()
    else:
        probs = (z.sub_(lse.unsqueeze(-1)) if owned else z - lse.unsqueeze(-1)).exp_()
    grad = probs.mul_(grad_out.unsqueeze(-1).neg())
    idx, in_shard = _local_targets(labels, vocab_start, z.shape[-1])
    grad.scatter_add_(-1, idx.unsqueeze(-1), torch.where(in_shard, grad_out, 0.0).unsqueeze(-1))
    return grad
