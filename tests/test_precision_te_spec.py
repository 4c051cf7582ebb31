"""The Transformer Engine layer spec is what `backend="auto"` builds wherever TE is importable, for all
three families. Part of the default suite: on machines without TE (every CPU machine: TE cannot be
imported without CUDA) it is skipped with TE's reason; in NVIDIA's PyTorch container it runs."""

from __future__ import annotations

import pytest

from dqo_megatron.config import ModelConfig
from tests.gpu.support import run_spawned, te_status

USABLE, REASON = te_status()
pytestmark = pytest.mark.skipif(not USABLE, reason=f"Transformer Engine not usable here: {REASON}")

COMMON = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, vocab_size=512, seq_length=64)
FAMILIES = {
    "llama": ModelConfig(family="llama", num_attention_heads=4, num_query_groups=2, **COMMON),
    "qwen2": ModelConfig(family="qwen2", num_attention_heads=4, num_query_groups=2, **COMMON),
    "gemma": ModelConfig(family="gemma", num_attention_heads=2, num_query_groups=1, kv_channels=96, **COMMON),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_auto_builds_the_te_spec_with_the_family_traits(family):
    from tests.gpu.bodies import te_spec_summary

    (out,) = run_spawned(te_spec_summary, 1, FAMILIES[family])
    assert out["backend"] == "te"
    assert {"TELayerNormColumnParallelLinear", "TERowParallelLinear", "TEDotProductAttention"} <= set(out["classes"])
    assert out["n_params"] == out["n_params_expected"]
    assert out["zero_centered_gamma"] == (family == "gemma")
    assert out["qkv_bias"] == (family == "qwen2")
    assert out["finite"] and out["all_grads"]
