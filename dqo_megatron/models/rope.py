"""Rotary position embedding (RoPE) as one autograd op, for layer specs without Transformer Engine.

RoPE rotates each (first-half, second-half) pair of a head's channels by a position-dependent angle.
With ``t = [t1, t2]`` split in halves along the head dim and angles ``theta`` (``freqs``, ``[s, 1, 1, d]``,
both halves equal), ``c = cos(theta)``, ``n = sin(theta)``::

    out1 = t1 * c1 - t2 * n1          d t1 = g1 * c1 + g2 * n2
    out2 = t2 * c2 + t1 * n2          d t2 = g2 * c2 - g1 * n1

(the gradient is the rotation by ``-theta``). Megatron's unfused version writes this as
``t * cos + rotate_half(t) * sin`` with ``rotate_half`` a `chunk` + `cat`, then `cat`s the unrotated
channels back on: three full copies of q and k per layer in forward and backward, which on CPU cost
more than a transformer layer's norms. Here the halves are written in place with `addcmul_` and only
cos/sin are saved for the backward.

How Megatron reaches it: with ``apply_rope_fusion=True`` Megatron's attention calls
``rope_utils.fused_apply_rotary_pos_emb(t, freqs, interleaved=...)``, a slot Megatron fills with
Transformer Engine's kernel when TE is installed and leaves None otherwise. `install_rope_kernel`
puts `apply_rotary_pos_emb_sbhd` in that slot only when it is empty, so TE's kernel is used where it
exists. Interleaved rotary and scaled (YaRN ``mscale``) rotary stay on Megatron's unfused path.
"""

from __future__ import annotations

import torch


class _RotaryEmbedding(torch.autograd.Function):
    """t ``[s, b, heads, d]``, cos/sin ``[s, 1, 1, rot]`` (rot <= d, even) -> ``[s, b, heads, d]``."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(t, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, sign: float) -> torch.Tensor:
    """Rotate the first ``rot`` channels of `t` by ``sign * theta``; copy the rest."""
    rot = cos.shape[-1]
    half = rot // 2
    x = t[..., :rot]
    out = torch.empty_like(t)
    y = out[..., :rot]
    torch.mul(x, cos, out=y)
    # sin(-theta) = -sin(theta): the backward is the same formula with the sign flipped.
    y[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    y[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    if rot < t.shape[-1]:
        out[..., rot:] = t[..., rot:]
    return out


def apply_rotary_pos_emb_sbhd(
    t: torch.Tensor, freqs: torch.Tensor, transpose_output_memory: bool = False, interleaved: bool = False
) -> torch.Tensor:
    """RoPE on ``t`` ``[s, b, heads, d]`` with angles ``freqs`` ``[s, 1, 1, rot]`` (rot <= d).

    Same signature and result as Megatron's slot ``fused_apply_rotary_pos_emb`` (TE's kernel):
    ``t * cos + rotate_half(t) * sin`` on the first ``rot`` channels, the rest passed through;
    cos/sin are computed in fp32 and cast to ``t.dtype`` as Megatron's unfused path does. Differentiable
    w.r.t. ``t``. `transpose_output_memory` is accepted and ignored (as TE does); `interleaved` rotary
    is not implemented here and goes to Megatron's unfused function.
    """
    if interleaved:
        from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

        return _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=True)
    if freqs.shape[-1] % 2 or freqs.shape[-1] > t.shape[-1]:
        raise ValueError(f"rotary dim {freqs.shape[-1]} must be even and at most the head dim {t.shape[-1]}")
    cos = torch.cos(freqs).to(t.dtype)
    sin = torch.sin(freqs).to(t.dtype)
    return _RotaryEmbedding.apply(t, cos, sin)


def install_rope_kernel(cuda: bool) -> bool:
    """Fill Megatron's empty fused-RoPE slot with `apply_rotary_pos_emb_sbhd`; say whether to fuse.

    Returns True when the slot now holds a kernel that runs on this machine: ours (any device), or
    TE's when `cuda` (TE's kernel, when installed, is never replaced; on a machine without a GPU it
    cannot run, so Megatron's unfused RoPE is used there).
    """
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rotary_pos_emb_sbhd
    return cuda or rope_utils.fused_apply_rotary_pos_emb is apply_rotary_pos_emb_sbhd
