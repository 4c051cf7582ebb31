"""Each family builds with its traits, runs forward/backward, and has the formula's parameter count."""

from __future__ import annotations

import math

import pytest
import torch

from dqo_megatron.config import ModelConfig, ParallelConfig
from dqo_megatron.models import expected_parameter_count
from tests.helpers.distributed import run_distributed

TINY = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, vocab_size=300)

FAMILIES = {
    "llama-mha-untied": ModelConfig(family="llama", **TINY),
    "llama-gqa-tied": ModelConfig(
        family="llama", **{**TINY, "num_layers": 3, "num_attention_heads": 8}, num_query_groups=2, tie_embeddings=True
    ),
    "qwen2": ModelConfig(family="qwen2", **TINY, num_query_groups=2),
    "gemma": ModelConfig(family="gemma", **TINY, num_query_groups=1, kv_channels=48),
}


def _build_and_run(model_cfg: ModelConfig):
    from dqo_megatron import parallel
    from dqo_megatron.models import build_model_chunks

    parallel.initialize(ParallelConfig(), seed=7)
    (gpt,) = build_model_chunks(model_cfg, ParallelConfig())
    tokens = torch.randint(0, model_cfg.vocab_size, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    logits = gpt(tokens, positions, None)
    logits.float().pow(2).mean().backward()
    params = dict(gpt.named_parameters())
    emb_out = {}
    hook = gpt.embedding.register_forward_hook(lambda m, i, o: emb_out.setdefault("x", o.detach()))
    gpt(tokens, positions, None)
    hook.remove()
    raw = gpt.embedding.word_embeddings(tokens).transpose(0, 1)
    qkv = gpt.decoder.layers[0].self_attention.linear_qkv
    return {
        "n_params": sum(p.numel() for p in gpt.parameters()),
        "logits_shape": tuple(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "all_grads": all(p.grad is not None or getattr(p, "main_grad", None) is not None for p in gpt.parameters()),
        "qkv_bias": qkv.bias is not None,
        "qkv_out": qkv.weight.shape[0],
        "has_output_weight": "output_layer.weight" in params,
        "norm_init": gpt.decoder.final_layernorm.weight.detach().clone(),
        "emb_scale": (emb_out["x"] / raw).mean().item(),
        "rotary_base": gpt.rotary_pos_emb.inv_freq[1].item(),
        "backend": gpt.backend,
    }


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_runs_and_counts(name):
    cfg = FAMILIES[name]
    (out,) = run_distributed(_build_and_run, 1, cfg)
    assert out["n_params"] == expected_parameter_count(cfg)
    assert out["logits_shape"] == (2, 16, cfg.vocab_size)
    assert out["finite"] and out["all_grads"]
    from dqo_megatron.compat import transformer_engine_status

    assert out["backend"] == ("te" if transformer_engine_status()[0] else "local")
    d, n, g = cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    assert out["qkv_out"] == n * d + 2 * g * d
    assert out["qkv_bias"] == (cfg.family == "qwen2")
    assert out["has_output_weight"] == (not cfg.tie_embeddings)
    if cfg.family == "gemma":
        assert torch.all(out["norm_init"] == 0)  # zero-centred gamma: y = x_hat * (1 + w)
        assert out["emb_scale"] == pytest.approx(math.sqrt(cfg.hidden_size), rel=1e-5)
    else:
        assert torch.all(out["norm_init"] == 1)
        assert out["emb_scale"] == pytest.approx(1.0, rel=1e-5)
    # inv_freq[1] = theta^(-2/d)
    assert out["rotary_base"] == pytest.approx(cfg.rotary_base ** (-2 / d), rel=1e-5)


def test_family_defaults():
    assert ModelConfig(family="qwen2").rotary_base == 1e6 and ModelConfig(family="qwen2").add_qkv_bias
    gemma = ModelConfig(family="gemma")
    assert gemma.tie_embeddings and gemma.activation == "geglu"
    llama = ModelConfig(family="llama", tie_embeddings=True)
    assert llama.tie_embeddings and llama.activation == "swiglu" and not llama.add_qkv_bias


def test_parameter_formula_on_a_known_model():
    # Llama-2-7B: 6,738,415,616 parameters (32 layers, hidden 4096, FFN 11008, 32 heads, vocab 32000)
    llama2_7b = ModelConfig(
        family="llama",
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        vocab_size=32000,
        seq_length=4096,
    )
    assert expected_parameter_count(llama2_7b) == 6_738_415_616
    # Qwen2-7B: 7,615,616,512 (28 layers, hidden 3584, FFN 18944, 28 heads, 4 KV heads, vocab 152064)
    qwen2_7b = ModelConfig(
        family="qwen2",
        num_layers=28,
        hidden_size=3584,
        ffn_hidden_size=18944,
        num_attention_heads=28,
        num_query_groups=4,
        vocab_size=152064,
        seq_length=4096,
    )
    assert expected_parameter_count(qwen2_7b) == 7_615_616_512
    # Gemma-7B: 8,537,680,896 (28 layers, hidden 3072, FFN 24576, 16 heads of 256, vocab 256000, tied)
    gemma_7b = ModelConfig(
        family="gemma",
        num_layers=28,
        hidden_size=3072,
        ffn_hidden_size=24576,
        num_attention_heads=16,
        kv_channels=256,
        vocab_size=256000,
        seq_length=4096,
    )
    assert expected_parameter_count(gemma_7b) == 8_537_680_896


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
@pytest.mark.parametrize("precision", [dict(dtype="bf16"), dict(dtype="auto", fp8="delayed")])
def test_cpu_rejects_low_precision_with_the_fix(precision):
    from dqo_megatron.config import ConfigError, PrecisionConfig
    from dqo_megatron.models import transformer_config

    with pytest.raises(ConfigError, match="precision"):
        transformer_config(FAMILIES["qwen2"], ParallelConfig(), PrecisionConfig(**precision))
