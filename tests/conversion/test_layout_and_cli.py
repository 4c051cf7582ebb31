"""The re-layouts against an explicit construction, the registry, and the CLI end to end."""

from __future__ import annotations

import json

import pytest
import torch

from dqo_megatron.conversion import ConversionError, families, family, family_for_hf_config
from dqo_megatron.conversion.layout import fuse_gate_up, interleave_qkv, split_gate_up, split_qkv
from tests.conversion.ranks import cli_rank, tiny_hf_model
from tests.helpers.distributed import run_distributed


@pytest.mark.parametrize("heads, groups, d", [(4, 2, 3), (8, 1, 2), (6, 6, 4), (8, 4, 5)])
def test_qkv_interleave_matches_an_explicit_per_group_order(heads, groups, d):
    h = 7
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    expected = []
    per_group = heads // groups
    for g in range(groups):  # Megatron: for each KV group, its query heads, then its key, then its value
        for j in range(g * per_group, (g + 1) * per_group):
            expected.append(q[j * d : (j + 1) * d])
        expected += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    fused = interleave_qkv(q, k, v, heads, groups, d)
    assert torch.equal(fused, torch.cat(expected))
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, heads, groups, d), (q, k, v)))
    bias = interleave_qkv(q[:, 0], k[:, 0], v[:, 0], heads, groups, d)
    assert torch.equal(bias, fused[:, 0])


def test_qkv_shape_errors_name_the_expectation():
    with pytest.raises(ValueError, match="expected 8/4/4"):
        interleave_qkv(torch.zeros(8, 2), torch.zeros(2, 2), torch.zeros(4, 2), 4, 2, 2)
    with pytest.raises(ValueError, match="expected 16 for 4 heads"):
        split_qkv(torch.zeros(12, 2), 4, 2, 2)


def test_gate_up():
    gate, up = torch.randn(5, 3), torch.randn(5, 3)
    fc1 = fuse_gate_up(gate, up)
    assert torch.equal(fc1[:5], gate) and torch.equal(fc1[5:], up)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fc1), (gate, up)))


def test_registry_lookup_and_family_configs():
    assert set(families()) == {"llama", "qwen2", "gemma"}
    assert family_for_hf_config({"architectures": ["Qwen2ForCausalLM"]}).name == "qwen2"
    assert family_for_hf_config({"model_type": "gemma"}).name == "gemma"
    with pytest.raises(ConversionError, match="no conversion family 'mamba'"):
        family("mamba")
    for variant, want in [
        (
            "gemma_headdim24_gqa",
            dict(family="gemma", kv_channels=24, tie_embeddings=True, add_qkv_bias=False, num_query_groups=2),
        ),
        ("qwen2_gqa_bias_untied", dict(family="qwen2", add_qkv_bias=True, tie_embeddings=False)),
        ("llama_gqa_untied", dict(family="llama", rotary_base=5000.0, norm_epsilon=1e-5)),
    ]:
        hf = json.loads(tiny_hf_model(variant).config.to_json_string())
        cfg = family_for_hf_config(hf).config_from_hf(hf)
        for key, value in want.items():
            assert getattr(cfg, key) == value, (variant, key)
        back = family(cfg.family).config_to_hf(cfg, None, torch.float32)
        assert family(cfg.family).config_from_hf(back) == cfg  # config.json <-> ModelConfig round trip


def test_cli_round_trip_with_verify(tmp_path):
    tiny_hf_model("gemma_headdim24_gqa").save_pretrained(tmp_path / "hf")
    code, output = run_distributed(
        cli_rank, 1, ["hf-to-megatron", str(tmp_path / "hf"), str(tmp_path / "meg"), "--verify", "--tp", "2"]
    )[0]
    assert code == 0, output
    assert "parity PASSED" in output and "wrote" in output
    code, output = run_distributed(
        cli_rank, 1, ["megatron-to-hf", str(tmp_path / "meg"), str(tmp_path / "back"), "--verify", "--dtype", "bf16"]
    )[0]
    assert code == 0, output
    assert "parity PASSED" in output
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    code, output = run_distributed(cli_rank, 1, ["value-from-megatron", str(tmp_path / "meg"), str(tmp_path / "v")])[0]
    assert code == 0, output
    assert json.loads((tmp_path / "v" / "checkpoint.json").read_text())["kind"] == "value"
