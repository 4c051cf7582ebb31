"""Pure tensor re-layouts between Hugging Face and Megatron-Core (no I/O, no Megatron import).

Megatron's fused ``linear_qkv`` stores the rows of one query group together so that a tensor-parallel
split along dim 0 hands each rank whole groups::

    for each KV group g = 0..G-1:
        q rows of the g-th block of heads   (n/G heads x d rows)
        k rows of KV head g                 (d rows)
        v rows of KV head g                 (d rows)

HF keeps ``q_proj`` ``[n*d, h]``, ``k_proj`` / ``v_proj`` ``[G*d, h]`` separately (biases ``[n*d]``,
``[G*d]``). Query head ``j`` belongs to group ``j // (n/G)`` in both frameworks (HF's ``repeat_kv``
repeats each KV head ``n/G`` times consecutively; Megatron's core attention does the same), so the
interleave is a pure row permutation. Gated MLPs store ``fc1 = [gate; up]`` (``[2f, h]``).
"""

from __future__ import annotations

import torch


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> None:
    if heads % groups:
        raise ValueError(f"query heads {heads} must be a multiple of KV groups {groups}")
    want_q, want_kv = heads * head_dim, groups * head_dim
    if q.shape[0] != want_q or k.shape[0] != want_kv or v.shape[0] != want_kv:
        raise ValueError(
            f"q/k/v have {q.shape[0]}/{k.shape[0]}/{v.shape[0]} rows; expected {want_q}/{want_kv}/{want_kv} "
            f"for {heads} heads, {groups} KV groups, head_dim {head_dim}"
        )
    if q.shape[1:] != k.shape[1:] or q.shape[1:] != v.shape[1:]:
        raise ValueError(f"q/k/v trailing shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def interleave_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int
) -> torch.Tensor:
    """Megatron's fused QKV from HF's separate projections.

    q ``[heads*d, ...]``, k/v ``[groups*d, ...]`` (weights ``[., h]`` or biases ``[.]``) ->
    ``[(heads + 2*groups)*d, ...]`` ordered ``[q_g, k_g, v_g]`` for each group g.
    """
    _check_qkv(q, k, v, heads, groups, head_dim)
    rest = q.shape[1:]
    per_group = heads // groups
    q_ = q.reshape(groups, per_group * head_dim, *rest)
    k_ = k.reshape(groups, head_dim, *rest)
    v_ = v.reshape(groups, head_dim, *rest)
    return torch.cat([q_, k_, v_], dim=1).reshape((heads + 2 * groups) * head_dim, *rest)


def split_qkv(
    qkv: torch.Tensor, heads: int, groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv`: fused ``[(heads+2*groups)*d, ...]`` -> (q ``[heads*d, ...]``,
    k ``[groups*d, ...]``, v ``[groups*d, ...]``), each contiguous."""
    if heads % groups:
        raise ValueError(f"query heads {heads} must be a multiple of KV groups {groups}")
    rows = (heads + 2 * groups) * head_dim
    if qkv.shape[0] != rows:
        raise ValueError(
            f"fused qkv has {qkv.shape[0]} rows; expected {rows} for {heads} heads, "
            f"{groups} KV groups, head_dim {head_dim}"
        )
    rest = qkv.shape[1:]
    per_group = heads // groups
    blocks = qkv.reshape(groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(blocks, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (
        q.reshape(heads * head_dim, *rest).contiguous(),
        k.reshape(groups * head_dim, *rest).contiguous(),
        v.reshape(groups * head_dim, *rest).contiguous(),
    )


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Megatron's gated ``fc1`` ``[2f, h]`` = cat(gate ``[f, h]``, up ``[f, h]``)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ in shape")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_gate_up`: ``[2f, h]`` -> (gate ``[f, h]``, up ``[f, h]``), each contiguous."""
    if fc1.shape[0] % 2:
        raise ValueError(f"gated fc1 has an odd number of rows {fc1.shape[0]}")
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``[V, h]`` -> ``[rows, h]`` with zero rows appended (rows >= V); the input itself when equal."""
    if weight.shape[0] == rows:
        return weight
    if weight.shape[0] > rows:
        raise ValueError(f"embedding has {weight.shape[0]} rows, more than the model's {rows}")
    out = weight.new_zeros(rows, *weight.shape[1:])
    out[: weight.shape[0]] = weight
    return out


def drop_padded_vocab_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[V_padded, h]`` -> ``[vocab_size, h]`` (Megatron pads the vocabulary for TP; HF does not)."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than vocab_size {vocab_size}")
    return weight[:vocab_size].contiguous()
