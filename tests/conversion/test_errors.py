"""Bad inputs: each a ConversionError (or a non-zero CLI exit) that names the problem, and no output
left behind -- neither the output directory nor a temporary one beside it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dqo_megatron.config import ParallelConfig
from dqo_megatron.conversion import ConversionError, hf_to_megatron, megatron_to_hf
from tests.conversion.ranks import (
    convert_expecting_error_rank,
    convert_rank,
    convert_with_broken_qkv_rank,
    tiny_hf_model,
)
from tests.helpers.distributed import run_distributed


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama (4 heads, 2 KV groups) saved in several shards."""
    root = tmp_path_factory.mktemp("errors")
    tiny_hf_model("llama_gqa_untied").save_pretrained(root / "hf", max_shard_size="40KB")
    return root / "hf"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _nothing_left(parent, name="out"):
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_shard(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConversionError, match=f"missing: {victim.name}"):
        hf_to_megatron(src, tmp_path / "out")
    assert _nothing_left(tmp_path)


def test_unknown_architecture(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConversionError, match=r"unknown architecture \['GPT2LMHeadModel'\].*LlamaForCausalLM"):
        hf_to_megatron(src, tmp_path / "out")
    assert _nothing_left(tmp_path)


@pytest.mark.parametrize(
    "layout, why",
    [
        (ParallelConfig(tensor_model_parallel_size=3), "must divide model.num_attention_heads=4"),
        (ParallelConfig(tensor_model_parallel_size=4), "must divide model.num_query_groups=2"),
        (ParallelConfig(pipeline_model_parallel_size=3), "num_layers=2 must be divisible"),
    ],
)
def test_layout_the_model_cannot_be_split_into(hf_dir, tmp_path, layout, why):
    with pytest.raises(ConversionError, match="cannot be split into") as err:
        hf_to_megatron(hf_dir, tmp_path / "out", layouts=[layout])
    assert why in str(err.value)
    assert _nothing_left(tmp_path)


def test_existing_output_without_overwrite(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="already exists .*; pass --overwrite"):
        hf_to_megatron(hf_dir, out)
    with pytest.raises(ConversionError, match="already exists"):
        megatron_to_hf(tmp_path / "anything", out)
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_overwrite_replaces_existing_output(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_distributed(convert_rank, 1, str(hf_dir), str(out), overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "weights" / "metadata.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3' is not supported"),
        ({"attention_bias": True}, "attention_bias=true is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"num_hidden_layers": 3}, r"tensors missing from the checkpoint: model\.layers\.2\."),
        ({"num_hidden_layers": 1}, r"no place for.*model\.layers\.1\."),
    ],
)
def test_config_the_model_cannot_represent(hf_dir, tmp_path, changes, match):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, **changes)
    with pytest.raises(ConversionError, match=match):
        hf_to_megatron(src, tmp_path / "out")
    assert _nothing_left(tmp_path)


def test_weights_disagreeing_with_config_fail_mid_conversion_without_output(hf_dir, tmp_path):
    src = _copy(hf_dir, tmp_path / "src")
    _edit_config(src, intermediate_size=80)  # the weights have 96
    (message,) = run_distributed(convert_expecting_error_rank, 1, str(src), str(tmp_path / "out"))
    assert message is not None and "config.json disagrees with the weights" in message
    assert _nothing_left(tmp_path)


def test_verify_catches_a_wrong_qkv_interleave_and_writes_nothing(hf_dir, tmp_path):
    (message,) = run_distributed(convert_with_broken_qkv_rank, 1, str(hf_dir), str(tmp_path / "out"))
    assert message is not None and "parity FAILED" in message and "nothing was written" in message
    assert _nothing_left(tmp_path)


def test_cli_errors_exit_non_zero_with_the_reason(hf_dir, tmp_path):
    from dqo_megatron.cli.convert import convert_app

    runner = CliRunner()
    result = runner.invoke(convert_app, ["hf-to-megatron", str(hf_dir), str(tmp_path / "out"), "--tp", "3"])
    assert result.exit_code == 2 and "cannot be split into TP=3" in result.output
    (tmp_path / "exists").mkdir()
    result = runner.invoke(convert_app, ["megatron-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "exists")])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(convert_app, ["megatron-to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out2")])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_verify_fails_on_a_model_with_a_nan_weight_and_writes_nothing(tmp_path):
    import torch

    model = tiny_hf_model("llama_gqa_untied")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan_hf")
    (message,) = run_distributed(
        convert_expecting_error_rank, 1, str(tmp_path / "nan_hf"), str(tmp_path / "out"), verify=True
    )
    assert message is not None and "parity FAILED" in message and "nothing was written" in message
    assert "non-finite weights" in message and "hf:model.layers.0.mlp.down_proj.weight (1)" in message
    assert _nothing_left(tmp_path)


def test_parity_cannot_pass_on_non_finite_logits():
    import torch

    from dqo_megatron.conversion.verify import compare_logits

    nan = torch.full((4, 8), float("nan"))
    report = compare_logits([nan], [nan.clone()], tolerance=1e-3)
    assert not report.passed and report.nonfinite_logits == 64 and "64 non-finite logits" in report.summary()
    good = torch.randn(4, 8)
    bad = good.clone()
    bad[1, 2] = float("inf")
    report = compare_logits([good], [bad], tolerance=1e-3)
    assert not report.passed and report.nonfinite_logits == 1 and report.max_abs_diff == 0.0
    assert compare_logits([good], [good.clone()], tolerance=1e-3).passed


def _convert_under_umask(src: str, out: str, umask: int) -> dict:
    import os
    import stat
    from pathlib import Path

    from dqo_megatron.conversion import hf_to_megatron

    os.umask(umask)
    hf_to_megatron(src, out, progress=False)
    return {str(p): stat.S_IMODE(p.stat().st_mode) for p in [Path(out), *Path(out).rglob("*")]}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(hf_dir, tmp_path, umask):
    """Staging with mkdtemp/mkstemp is private (0700/0600); the renamed output must not stay so."""
    import os

    (modes,) = run_distributed(_convert_under_umask, 1, str(hf_dir), str(tmp_path / "out"), umask)
    assert len(modes) > 3
    for path, mode in modes.items():
        want = (0o777 if os.path.isdir(path) else 0o666) & ~umask
        assert mode == want, f"{path}: {oct(mode)}, want {oct(want)} under umask {oct(umask)}"
