"""One rule for reading a tokenizer directory (`dqo_megatron.tokenizer_files`): the tokenizer training reads
from a directory and the one the HF export writes from it give the same ids, for a directory holding only
tokenizer.model, only tokenizer.json, both, and none (~10 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqo_megatron.config import ConfigError
from dqo_megatron.conversion import ConversionError
from dqo_megatron.conversion.hf_tokenizer import checked_tokenizer_source, export_tokenizer
from dqo_megatron.data.tokenize import Tokenizer, TokenizerConfig
from dqo_megatron.tokenizer_files import holds_tokenizer, sentencepiece_model_file, tokenizer_kind

TEXTS = ["What is 12 plus 30?", "Step 1: 2 + 0 = 2.\n#### 42", "  odd  spacing\tand é 日本", "x"]


def _byte_level_tokenizer_json(out: Path) -> None:
    """tokenizer.json (alone) of a byte-level BPE trained here: ids unlike any sentencepiece model's."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    tk.save(str(out / "tokenizer.json"))


@pytest.fixture(scope="module")
def directories(shared_data, tmp_path_factory) -> dict[str, Path]:
    """A directory with only tokenizer.model, only tokenizer.json, both, and none (config.json only)."""
    sp_model = shared_data / "models" / "stories260K" / "tok512.model"
    root = tmp_path_factory.mktemp("tokenizer_dirs")
    dirs = {name: root / name for name in ("model_only", "json_only", "both", "none")}
    for d in dirs.values():
        d.mkdir()
        (d / "config.json").write_text("{}")  # a model directory's, never a tokenizer file
    for name in ("model_only", "both"):
        shutil.copyfile(sp_model, dirs[name] / "tokenizer.model")
    for name in ("json_only", "both"):
        _byte_level_tokenizer_json(dirs[name])
    return dirs


def _ids(tok: Tokenizer) -> list[list[int]]:
    """The ids preprocessing writes for TEXTS as prompts (framed) and as responses."""
    prompts = tok.encode_prompts([tok.render_prompt(t, {}) for t in TEXTS])
    responses, _ = tok.encode_responses(TEXTS, [False] * len(TEXTS))
    return [list(ids) for ids in prompts] + [list(ids) for ids in responses]


def _export(source: Path, out: Path) -> Path:
    """The tokenizer files an HF export writes from `source`, as the export reads it."""
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"vocab_size": 1024}))
    export_tokenizer(checked_tokenizer_source(source), out, 1024)
    return out


@pytest.mark.parametrize(
    "name, kind", [("model_only", "sentencepiece"), ("json_only", "hf"), ("both", "hf"), ("none", None)]
)
def test_training_and_the_export_read_a_directory_alike(directories, tmp_path, name, kind):
    d = directories[name]
    assert tokenizer_kind(d) == kind and holds_tokenizer(d) == (kind is not None)
    if kind is None:  # refused by both, each naming the directory
        with pytest.raises(ConfigError, match=f"{d}.* holds no tokenizer files"):
            TokenizerConfig(path=str(d))
        with pytest.raises(ConversionError, match=f"{d} holds no tokenizer files"):
            checked_tokenizer_source(d)
        return
    training = Tokenizer(TokenizerConfig(path=str(d), eos_token="</s>"))  # tokenizer.json alone names no EOS
    assert training.cfg.kind == kind
    shipped = checked_tokenizer_source(d)
    assert (shipped.proto is not None) == (kind == "sentencepiece")  # converted, or copied as it is
    assert shipped.model_file == sentencepiece_model_file(d)
    exported = Tokenizer(TokenizerConfig(path=str(_export(d, tmp_path / "hf")), eos_token="</s>"))
    assert _ids(exported) == _ids(training)
    if kind == "sentencepiece":  # and the directory reads as its lone .model file does
        assert _ids(Tokenizer(TokenizerConfig(path=str(d / "tokenizer.model"), eos_token="</s>"))) == _ids(training)


def test_a_lone_tokenizer_model_is_not_read_by_transformers(directories):
    """kind="hf" for a directory with only tokenizer.model would give transformers' guessed ids: refused."""
    d = directories["model_only"]
    with pytest.raises(ConfigError, match="only a sentencepiece tokenizer.model.*kind auto or sentencepiece"):
        TokenizerConfig(path=str(d), kind="hf")
    assert TokenizerConfig(path=str(d), kind="sentencepiece").kind == "sentencepiece"
    with pytest.raises(ConfigError, match="a sentencepiece tokenizer is a .model file"):
        TokenizerConfig(path=str(directories["both"]), kind="sentencepiece")
    with pytest.raises(ConfigError, match="chat_template is set, but .* read with sentencepiece"):
        TokenizerConfig(path=str(d), chat_template="{{ messages }}")  # not dropped without a word


def test_files_that_are_not_model_files_hold_no_tokenizer(directories):
    assert tokenizer_kind(directories["none"] / "config.json") is None
    assert tokenizer_kind(directories["none"] / "missing") is None
    assert sentencepiece_model_file(directories["json_only"]) is None
