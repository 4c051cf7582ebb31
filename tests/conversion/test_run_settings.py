"""The run's settings in a converted checkpoint: `convert --make-vocab-size-divisible-by / --seq-length`,
export writing back the model's own max_position_embeddings, and the trainer's rule (any vocabulary
padding loads, at TP=2 too, with exact logits; seq_length may be shorter than the checkpoint's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig
from dqo_megatron.training.initial_weights import check_same_model
from tests.conversion.ranks import cli_rank, hf_reference_logits, last_stage_logits, layout_logits, tiny_hf_model
from tests.helpers.distributed import run_distributed

TOLERANCE = 1e-4


def _stored_rows(meg_dir: Path) -> int:
    """Rows of the embedding as stored in the checkpoint's files (torch's index, nothing loaded)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(meg_dir / "weights")).read_metadata()
    return int(meta.state_dict_metadata["embedding.word_embeddings.weight"].size[0])


def _with_padding(src: Path, dst: Path, divisible_by: int, weights: Path | None = None) -> Path:
    """A copy of checkpoint `src` whose model_config.yaml asks for another padding (optionally other weights)."""
    shutil.copytree(src, dst)
    if weights is not None:
        shutil.rmtree(dst / "weights")
        shutil.copytree(weights, dst / "weights")
    config = yaml.safe_load((dst / "model_config.yaml").read_text())
    config["make_vocab_size_divisible_by"] = divisible_by
    (dst / "model_config.yaml").write_text(yaml.safe_dump(config))
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A tiny Qwen2 (vocab 101, max_position_embeddings 64) through the CLI with the example configs'
    settings: padding 128 (the default) and seq_length 32."""
    root = tmp_path_factory.mktemp("run_settings")
    model = tiny_hf_model("qwen2_gqa_bias_untied")
    model.save_pretrained(root / "hf")
    code, output = run_distributed(
        cli_rank, 1, ["hf-to-megatron", str(root / "hf"), str(root / "meg"), "--verify", "--seq-length", "32"]
    )[0]
    assert code == 0, output
    return model, root, output


def test_convert_writes_the_padding_and_seq_length_and_stores_the_vocabulary_unpadded(converted):
    _model, root, output = converted
    written = yaml.safe_load((root / "meg" / "model_config.yaml").read_text())
    assert written["make_vocab_size_divisible_by"] == 128 and written["seq_length"] == 32
    assert "seq_length=32, make_vocab_size_divisible_by=128" in output and "parity PASSED" in output
    assert _stored_rows(root / "meg") == 101


def test_export_writes_back_the_models_max_position_embeddings(converted):
    _model, root, _ = converted
    code, output = run_distributed(cli_rank, 1, ["megatron-to-hf", str(root / "meg"), str(root / "back"), "--verify"])[
        0
    ]
    assert code == 0, output
    config = json.loads((root / "back" / "config.json").read_text())
    assert config["max_position_embeddings"] == 64 and config["vocab_size"] == 101


def test_seq_length_beyond_max_position_embeddings_is_refused(converted, tmp_path):
    _model, root, _ = converted
    code, output = run_distributed(
        cli_rank, 1, ["hf-to-megatron", str(root / "hf"), str(tmp_path / "out"), "--seq-length", "65"]
    )[0]
    assert code == 2 and "--seq-length 65 is longer than" in output and "max_position_embeddings=64" in output
    assert not (tmp_path / "out").exists()


def test_any_padding_loads_at_tp2_with_the_checkpoints_logits(converted, tmp_path):
    """Unpadded rows (101) into TP=2 padding 128 (256 rows), and 128 stored rows into TP=2 padding 1 (102
    rows): Megatron reshards the embedding and output layer either way; logits equal transformers'."""
    model, root, _ = converted
    want = hf_reference_logits(model)
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    padded_up = last_stage_logits(run_distributed(layout_logits, 2, str(root / "meg"), tp2))
    resaved = tmp_path / "rows128"
    run_distributed(layout_logits, 1, str(root / "meg"), ParallelConfig(), save_to=str(resaved))
    narrow = _with_padding(root / "meg", tmp_path / "narrow", 1, weights=resaved)
    assert _stored_rows(narrow) == 128
    padded_down = last_stage_logits(run_distributed(layout_logits, 2, str(narrow), tp2))
    for expected, up, down in zip(want, padded_up, padded_down):
        torch.testing.assert_close(up, expected, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(down, expected, atol=TOLERANCE, rtol=0)


def test_padding_rows_beyond_the_vocabulary_load_as_zeros(converted):
    _model, root, _ = converted
    results = run_distributed(layout_logits, 2, str(root / "meg"), ParallelConfig(tensor_model_parallel_size=2))
    rows = {r["tp_rank"]: r["params"]["embedding.word_embeddings.weight"] for r in results}
    full = torch.cat([rows[0], rows[1]])
    assert full.shape[0] == 256 and full[101:].abs().max() == 0 and full[:101].abs().max() > 0


def test_trainer_rule_padding_free_seq_length_shorter():
    ckpt = ModelConfig(family="qwen2", vocab_size=101, seq_length=32768, make_vocab_size_divisible_by=1)
    run = ModelConfig(family="qwen2", vocab_size=101, seq_length=4096, make_vocab_size_divisible_by=128)
    check_same_model(run, ckpt, "init checkpoint ckpt/x")
    longer = ModelConfig(family="qwen2", vocab_size=101, seq_length=65536)
    with pytest.raises(
        ConfigError, match=r"model.seq_length=65536 is longer than the checkpoint's 32768 .*--seq-length"
    ):
        check_same_model(longer, ckpt, "init checkpoint ckpt/x")
    other = ModelConfig(family="qwen2", vocab_size=102, seq_length=4096)
    with pytest.raises(ConfigError, match=r"ckpt/x was converted for another model: model.vocab_size=102 .checkpoint"):
        check_same_model(other, ckpt, "init checkpoint ckpt/x")
