"""Our fused RoPE op and SwiGLU module against Megatron's unfused versions and brute-force formulas."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.models.rope import apply_rotary_pos_emb_sbhd, install_rope_kernel


def _freqs(seq: int, rot: int, dtype=torch.float64) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=dtype) / rot))
    angles = torch.outer(torch.arange(seq, dtype=dtype), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]  # Megatron's [s, 1, 1, rot] layout


def _by_hand(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (i, i + rot/2) by its angle, element by element."""
    out = t.clone()
    rot = freqs.shape[-1]
    half = rot // 2
    s, b, h, _ = t.shape
    for pos in range(s):
        for i in range(half):
            theta = float(freqs[pos, 0, 0, i])
            c, n = torch.cos(torch.tensor(theta, dtype=t.dtype)), torch.sin(torch.tensor(theta, dtype=t.dtype))
            x, y = t[pos, :, :, i], t[pos, :, :, i + half]
            out[pos, :, :, i] = x * c - y * n
            out[pos, :, :, i + half] = y * c + x * n
    return out


@pytest.mark.parametrize("rot", [8, 4], ids=["full", "partial"])
def test_rope_matches_rotation_and_megatron_unfused(rot):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(0)
    t = torch.randn(5, 2, 3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    freqs = _freqs(5, rot)
    ours = apply_rotary_pos_emb_sbhd(t, freqs)
    torch.testing.assert_close(ours, _by_hand(t.detach(), freqs), rtol=0, atol=1e-12)
    t_ref = t.detach().clone().requires_grad_()
    megatron = _apply_rotary_pos_emb_bshd(t_ref, freqs)
    torch.testing.assert_close(ours, megatron, rtol=0, atol=1e-12)
    upstream = torch.randn(ours.shape, dtype=torch.float64, generator=gen)
    (ours * upstream).sum().backward()
    (megatron * upstream).sum().backward()
    torch.testing.assert_close(t.grad, t_ref.grad, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x: apply_rotary_pos_emb_sbhd(x, freqs), (t.detach().clone().requires_grad_(),)
    )


def test_rope_bf16_close_to_megatron_and_input_untouched():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    t = torch.randn(16, 2, 4, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = t.clone()
    freqs = _freqs(16, 64, torch.float32)
    ours = apply_rotary_pos_emb_sbhd(t, freqs)
    assert ours.dtype == torch.bfloat16 and torch.equal(t, before)
    torch.testing.assert_close(ours.float(), _apply_rotary_pos_emb_bshd(t, freqs).float(), rtol=0.02, atol=0.02)


def test_rope_rejects_odd_or_oversized_rotary_dim():
    with pytest.raises(ValueError, match="rotary dim 10"):
        apply_rotary_pos_emb_sbhd(torch.zeros(2, 1, 1, 8), torch.zeros(2, 1, 1, 10))


def test_install_fills_only_an_empty_slot(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    assert install_rope_kernel(cuda=False) and rope_utils.fused_apply_rotary_pos_emb is apply_rotary_pos_emb_sbhd

    def te_kernel(t, freqs, transpose_output_memory=False, interleaved=False):
        return t

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", te_kernel)
    assert install_rope_kernel(cuda=True) and rope_utils.fused_apply_rotary_pos_emb is te_kernel  # TE's kept
    # TE installed on a machine without a GPU: its kernel stays, and RoPE is not fused there.
    assert not install_rope_kernel(cuda=False) and rope_utils.fused_apply_rotary_pos_emb is te_kernel


def test_local_spec_config_without_gpu_fuses_rope_only_with_our_kernel(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from dqo_megatron.config import ModelConfig, ParallelConfig, PrecisionConfig
    from dqo_megatron.models.builder import transformer_config_kwargs

    model = ModelConfig(
        family="llama",
        num_layers=1,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        vocab_size=128,
        seq_length=16,
    )
    args = (model, ParallelConfig(), PrecisionConfig())
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", None)
    assert transformer_config_kwargs(*args, backend="local", cuda=False)["apply_rope_fusion"]
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda t, freqs, **kw: t)  # "TE's"
    assert not transformer_config_kwargs(*args, backend="local", cuda=False)["apply_rope_fusion"]


def test_swiglu_module_matches_silu_times_up_with_gradients():
    """The local spec's fused SwiGLU against ``silu(gate) * up`` by autograd, fp64, and gradcheck."""
    from dqo_megatron.models.local_spec import SwiGLU

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 10, dtype=torch.float64, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours = SwiGLU()(x)
    gate, up = x_ref.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-14)
    upstream = torch.randn(ours.shape, dtype=torch.float64, generator=gen)
    (ours * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(SwiGLU(), (x.detach().clone().requires_grad_(),))
    # A non-contiguous input (as a slice of a larger activation) gives the same result.
    wide = torch.randn(6, 3, 14, dtype=torch.float64, generator=gen)[..., 2:12]
    torch.testing.assert_close(SwiGLU()(wide), torch.nn.functional.silu(wide[..., :5]) * wide[..., 5:])
