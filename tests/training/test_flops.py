"""The FLOP estimate against an explicit count for a small model."""

import pytest

from dqo_megatron.config import ModelConfig
from dqo_megatron.training.flops import forward_flops_per_token, peak_tflops_per_device, step_flops


def test_forward_flops_by_hand():
    m = ModelConfig(
        family="llama",
        num_layers=2,
        hidden_size=8,
        ffn_hidden_size=16,
        num_attention_heads=2,
        vocab_size=10,
        seq_length=4,
    )
    # per layer: qkv 8*24 + proj 8*8 + mlp 3*8*16 + norms 2*8 = 192 + 64 + 384 + 16 = 656; + final norm 8
    non_embedding = 2 * 656 + 8
    expected = 2 * non_embedding + 4 * 2 * 8 * 4 + 2 * 8 * 10
    assert forward_flops_per_token(m, 4) == expected
    assert step_flops(m, 100, 4, value_network=True, reference_model=True) == pytest.approx(
        100 * (3 * expected + 3 * (expected - 2 * 8 * 10) + expected)
    )


def test_peak_is_configured_or_unknown_on_cpu():
    assert peak_tflops_per_device(123.0) == 123.0
