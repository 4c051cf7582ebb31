"""One dtype table (`dqo_megatron.config.dtypes`): every spelling means the same torch dtype wherever a dtype is
taken (model building, conversion, generation, value analysis), and importing the table imports no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dqo_megatron.config import ConfigError
from dqo_megatron.config.dtypes import DTYPE_ALIASES, dtype_from_torch, torch_dtype

SPELLINGS = {
    torch.float32: ("fp32", "float32", "FP32", " Float32 "),
    torch.bfloat16: ("bf16", "bfloat16", "BF16"),
    torch.float16: ("fp16", "float16"),
}


def test_every_spelling_is_one_torch_dtype_and_back():
    for expected, names in SPELLINGS.items():
        for name in names:
            assert torch_dtype(name) == expected
            assert dtype_from_torch(expected) == DTYPE_ALIASES[name.strip().lower()]
    assert dtype_from_torch(torch.float64) is None and dtype_from_torch(torch.int8) is None
    for bad in ("auto", "half", "float64"):
        with pytest.raises(ConfigError, match=f"model.dtype={bad!r}: choose fp32"):
            torch_dtype(bad, "model.dtype")


def test_the_table_imports_no_torch():
    code = "import sys, dqo_megatron.config.dtypes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_conversion_and_generation_take_every_spelling():
    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.conversion.convert import _resolve_dtype
    from dqo_megatron.conversion.megatron_io import CheckpointInfo, dtype_name
    from dqo_megatron.rollout.framing import resolve_dtype

    for expected, names in SPELLINGS.items():
        for name in names:
            assert _resolve_dtype(name, set(), Path("ckpt")) == expected
            assert resolve_dtype(name, "cpu") == expected
        assert CheckpointInfo(family="llama", dtype=dtype_name(expected)).torch_dtype == expected
    assert resolve_dtype("float64", "cpu") == torch.float64  # tests' exact comparisons
    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="dtype='half': choose auto, float32, bfloat16, float16 or float64"):
        resolve_dtype("half", "cpu")
    with pytest.raises(ConversionError, match="dtype 'float64' is not one of auto, fp32, bf16, fp16"):
        _resolve_dtype("float64", set(), Path("ckpt"))
    with pytest.raises(ConversionError, match=r"parameter dtype torch.float64 is not supported"):
        dtype_name(torch.float64)


@pytest.mark.parametrize("given, kept", [("bfloat16", "bf16"), ("float32", "fp32"), ("FP16", "fp16"), ("auto", "auto")])
def test_value_analysis_takes_the_long_names(tmp_path, given, kept):
    """The Python API refused "bfloat16" where every command and config key takes it."""
    from dqo_megatron.analysis.value_analysis import ValueAnalysisConfig
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"")  # the path is checked, not loaded
    cfg = ValueAnalysisConfig(
        checkpoints=[str(tmp_path / "ck")],
        records=[str(tmp_path / "r.jsonl")],
        out_dir=str(tmp_path / "va"),
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=str(model))),
        dtype=given,
    )
    assert cfg.dtype == kept


def test_value_analysis_names_a_wrong_dtype(tmp_path):
    from dqo_megatron.analysis.value_analysis import ValueAnalysisConfig
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"dtype='half': choose auto \| fp32 \(= float32\)"):
        ValueAnalysisConfig(
            checkpoints=[str(tmp_path / "ck")],
            records=[str(tmp_path / "r.jsonl")],
            out_dir=str(tmp_path / "va"),
            tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=str(model))),
            dtype="half",
        )
