"""Bad paths and options named as what they are: a file where a directory is expected and the reverse,
damaged safetensors, impossible tolerances, unloadable tokenizers. Each ends in one line (exit 2) that
names the path, and nothing is written."""

from __future__ import annotations

import json
import os
import pickle

import pytest
from typer.testing import CliRunner

from dqo_megatron.cli import app
from tests.conversion.ranks import tiny_hf_model

runner = CliRunner()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    tiny_hf_model("llama_gqa_untied").save_pretrained(root / "hf")
    return root / "hf"


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected error" not in result.output, result.output
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def test_convert_names_a_file_given_for_a_directory(hf_dir, tmp_path):
    r = runner.invoke(app, ["convert", "hf-to-megatron", str(hf_dir / "model.safetensors"), str(tmp_path / "o")])
    _one_line_error(r, "model.safetensors is a file", "directory")
    r = runner.invoke(app, ["convert", "megatron-to-hf", str(tmp_path / "ck"), str(tmp_path / "o2"), "--tokenizer",
                            str(hf_dir / "config.json")])  # fmt: skip
    _one_line_error(r, "config.json is a file")
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_convert_names_damaged_safetensors(hf_dir, tmp_path, damage):
    src = tmp_path / "hf"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    r = runner.invoke(app, ["convert", "hf-to-megatron", str(src), str(tmp_path / "out")])
    _one_line_error(r, f"{weights}: not a readable safetensors file")
    assert not (tmp_path / "out").exists() and sorted(os.listdir(tmp_path)) == ["hf"]


@pytest.mark.parametrize("tolerance", ["-1", "nan", "inf"])
def test_impossible_tolerances_are_refused_before_any_work(hf_dir, tmp_path, tolerance):
    r = runner.invoke(app, ["convert", "hf-to-megatron", str(hf_dir), str(tmp_path / "o"), "--verify", "--tolerance",
                            tolerance])  # fmt: skip
    _one_line_error(r, f"--tolerance {float(tolerance)}", "finite number >= 0")
    assert sorted(os.listdir(tmp_path)) == []


def test_preprocess_prefix_that_is_a_directory(tmp_path, sp_model):
    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"prompt": "p", "response": "r", "reward": 1}) + "\n")
    (tmp_path / "out").mkdir()
    for prefix in (str(tmp_path / "out") + "/", str(tmp_path / "out")):
        r = runner.invoke(app, ["preprocess", str(rec), "-o", prefix, "-t", sp_model, "--no-progress"])
        _one_line_error(r, "is a directory", "give a file prefix inside it")
    assert os.listdir(tmp_path / "out") == []


def test_tokenizer_paths_that_are_not_tokenizers(tmp_path, hf_dir):
    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"prompt": "p", "response": "r", "reward": 1}) + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    fake = tmp_path / "fake.model"
    fake.write_bytes(b"not a sentencepiece model")
    cases = [(empty, "holds no tokenizer files"), (rec, "is a file but not a sentencepiece .model"),
             (fake, "not a sentencepiece model")]  # fmt: skip
    for tok, message in cases:
        r = runner.invoke(app, ["preprocess", str(rec), "-o", str(tmp_path / "d" / "x"), "-t", str(tok), "--no-progress"])
        _one_line_error(r, str(tok), message)
    assert not (tmp_path / "d").exists()


def test_a_refused_pickle_is_not_answered_with_advice_to_unpickle_it():
    from dqo_megatron.training.checkpoint_integrity import one_line

    torch_text = ("Weights only load failed. This file can still be loaded, to do so you have two options, do those "
                  "steps only if you trust the source of the checkpoint.\n (1) In PyTorch 2.6, we changed the default "
                  "value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` "
                  "with `weights_only` set to `False` will likely succeed")  # fmt: skip
    line = one_line(pickle.UnpicklingError(torch_text))
    assert "weights_only=True" in line and "refuses" in line and "set to `False`" not in line and "\n" not in line


def test_problem_files_name_the_bad_line(tmp_path):
    from dqo_megatron.tasks.datasets import load_problems

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + '{"question": "x\\ud800", "answer": "#### 2"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: a string holds a lone surrogate"):
        load_problems(path)
    path.write_bytes(json.dumps({"question": "1+1?", "answer": "#### 2"}).encode() + b"\n\x80\x81 garbage\n")
    with pytest.raises(ValueError, match=r"p.jsonl:2: not UTF-8 text"):
        load_problems(path)


def test_rollout_options_and_sidecars_that_cannot_work(tmp_path, monkeypatch):
    import torch

    from dqo_megatron.config import ConfigError
    from dqo_megatron.rollout.framing import resolve_device
    from dqo_megatron.rollout.rollout import RolloutConfig, check_settings

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    with pytest.raises(ConfigError, match="stop strings must be non-empty"):
        RolloutConfig(problems=str(problems), output=str(tmp_path / "o.jsonl"), stop=[""])
    with pytest.raises(ConfigError, match="is a directory"):
        RolloutConfig(problems=str(problems), output=str(tmp_path))
    out = tmp_path / "o.jsonl"
    out.write_text("")
    cfg = RolloutConfig(problems=str(problems), output=str(out))
    for sidecar in ('{"version": 1, "sett', "[1, 2]", '{"settings": [1]}'):
        (tmp_path / "o.jsonl.meta.json").write_text(sidecar)
        with pytest.raises(ConfigError, match=r"o.jsonl.meta.json: not a rollout settings file"):
            check_settings(cfg, {"n": 20})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is usable here"):
        resolve_device("cuda")


def test_a_token_beyond_the_tokenizer_says_the_tokenizer_does_not_match(sp_model):
    from dqo_megatron.data.tokenize import Tokenizer, TokenizerConfig

    tok = Tokenizer(TokenizerConfig(path=sp_model))
    with pytest.raises(ValueError, match="token id 600 is beyond tokenizer .* \\(vocabulary 512\\): the tokenizer does "
                                         "not match the model"):  # fmt: skip
        tok.decode([5, 600])
