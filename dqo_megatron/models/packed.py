"""Packed rows on the model side: attention that stops at document boundaries, RoPE that restarts.

A packed row holds several documents. Two things must hold for each document to see the row as it
would see a row of its own:

* Attention: a token attends to earlier tokens of its own document only. On the local spec
  (`local_spec.SDPACoreAttention`, CPU or GPU) this is Megatron's boolean ``attention_mask`` (True =
  masked out), block-diagonal and causal: `document_attention_mask`. Under context parallelism each
  rank holds the query positions of chunks r and 2*cp-1-r, and the core attention all-gathers K/V in
  rank order, so the mask's rows are this rank's positions and its columns every rank's, in that
  order; all ranks derive it from the same whole-row document ids, so they agree on what each token
  sees.
* Positions: Megatron's `GPTModel` computes RoPE angles from the sequence length (positions 0..s-1
  of the row), not from ``position_ids``. Inside `rotary_from_position_ids` each GPT's RoPE module
  returns angles computed from ``position_ids`` instead (``[s_local, b, 1, rot]``, one angle per
  token and row), so positions restart at 0 in every document, exactly as Megatron's own arithmetic
  gives them to a document at the start of a row (``position * inv_freq`` in fp32). With a
  block-diagonal mask RoPE scores depend only on distances inside a document, so this changes only
  rounding; it keeps packed == padded to fp32 precision on long rows. Both our RoPE kernel
  (`models/rope.py`) and Megatron's unfused one broadcast over the batch dimension.

On GPU with Transformer Engine the packed path is Megatron's THD format instead: the rows flattened to
one sequence ``[1, R*s]`` with `PackedSeqParams` (qkv_format "thd", cu_seqlens of the documents), so
TE's attention and RoPE restart per document without a mask (`thd_packed_seq_params`). That path is
written, not run: no GPU has run it yet (docs/packing.md).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from dqo_megatron.parallel import cp_local_positions


def document_attention_mask(document_ids: torch.Tensor, cp_size: int = 1, cp_rank: int = 0) -> torch.Tensor:
    """Megatron's attention mask (True = masked out) for packed rows: causal inside each document.

    document_ids: ``[b, s]`` the document of every input token of the whole rows (any equal ids
    form one document, e.g. -1 on padding). Returns ``[b, 1, s/cp, s]`` bool: rows are the query
    positions this CP rank holds (chunks r and 2*cp-1-r of 2*cp), columns the key positions of
    ranks 0..cp-1 in turn (the order of the core attention's K/V all-gather).
    """
    b, s = document_ids.shape
    device = document_ids.device
    if cp_size == 1:
        queries = keys = torch.arange(s, device=device)
    else:
        local = s // cp_size
        queries = cp_local_positions(local, cp_size, cp_rank, device)
        keys = torch.cat([cp_local_positions(local, cp_size, r, device) for r in range(cp_size)])
    same = document_ids[:, queries, None] == document_ids[:, None, keys]
    causal = queries[:, None] >= keys[None, :]
    return ~(same & causal)[:, None]


def masks_documents(model: torch.nn.Module) -> bool:
    """Whether `model`'s attention applies `document_attention_mask` (our local spec's
    `SDPACoreAttention`). Transformer Engine's attention, built for causal masks, does not read a
    boolean mask, so packed rows there need the THD format (or must be refused) instead."""
    from dqo_megatron.models.local_spec import SDPACoreAttention

    return any(isinstance(m, SDPACoreAttention) for m in model.modules())


def this_rank_document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """`document_attention_mask` for this process's context-parallel rank (Megatron's parallel state)."""
    from megatron.core import parallel_state

    cp = parallel_state.get_context_parallel_world_size()
    return document_attention_mask(document_ids, cp, parallel_state.get_context_parallel_rank() if cp > 1 else 0)


def rotary_angles(rope, position_ids: torch.Tensor) -> torch.Tensor:
    """RoPE angles of Megatron's `RotaryEmbedding` `rope` at `position_ids` ``[b, s]``:
    ``[s, b, 1, rot]`` (rot = its rotary dimension), the same fp32 arithmetic as its `get_emb`."""
    if getattr(rope, "rotary_interleaved", False):
        raise NotImplementedError("packed rows with interleaved RoPE")
    inv_freq = rope.inv_freq.to(position_ids.device)
    positions = position_ids.t().to(inv_freq.dtype)
    if getattr(rope, "seq_len_interpolation_factor", None) is not None:
        positions = positions * (1 / rope.seq_len_interpolation_factor)
    freqs = positions[..., None] * inv_freq  # [s, b, rot/2]
    return torch.cat((freqs, freqs), dim=-1)[:, :, None, :]


@contextlib.contextmanager
def rotary_from_position_ids(gpts: Iterable, position_ids: torch.Tensor) -> Iterator[None]:
    """Inside the block, every GPTModel in `gpts` rotates q/k by `position_ids` ``[b, s_local]``
    (this CP rank's positions) instead of by 0..s-1 (see the module docstring)."""
    patched = []
    try:
        for gpt in gpts:
            rope = getattr(gpt, "rotary_pos_emb", None)
            if rope is None:
                continue
            angles = rotary_angles(rope, position_ids)
            # An instance attribute shadows the (lru-cached) method for this forward only.
            rope.forward = lambda *args, _angles=angles, **kwargs: _angles
            patched.append(rope)
        yield
    finally:
        for rope in patched:
            del rope.forward


def thd_packed_seq_params(document_ids: torch.Tensor):
    """Megatron's `PackedSeqParams` (THD) for packed rows flattened to one sequence ``[1, b*s]``: one
    segment per document and one per padding token run, as TE's fused attention expects.

    document_ids ``[b, s]`` (-1 on padding). UNTESTED on a GPU (written for the TE spec; the CPU path
    is `document_attention_mask`). Under context parallelism TE needs every segment padded to a
    multiple of 2*cp (`cu_seqlens_q_padded`), which this does not do yet.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = document_ids.shape
    flat = document_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[torch.arange(0, b * s, s, device=flat.device)] = True  # a row starts a segment
    bounds = torch.nonzero(starts).flatten()
    cu = torch.cat([bounds, torch.tensor([b * s], device=flat.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest
    )
