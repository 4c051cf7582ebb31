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
    r = runner.invoke(
        app,
        [
            "convert",
            "megatron-to-hf",
            str(tmp_path / "ck"),
            str(tmp_path / "o2"),
            "--tokenizer",
            str(hf_dir / "config.json"),
        ],
    )
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
    r = runner.invoke(
        app, ["convert", "hf-to-megatron", str(hf_dir), str(tmp_path / "o"), "--verify", "--tolerance", tolerance]
    )
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
    cases = [
        (empty, "holds no tokenizer files"),
        (rec, "is a file but not a sentencepiece .model"),
        (fake, "not a sentencepiece model"),
    ]
    for tok, message in cases:
        r = runner.invoke(
            app, ["preprocess", str(rec), "-o", str(tmp_path / "d" / "x"), "-t", str(tok), "--no-progress"]
        )
        _one_line_error(r, str(tok), message)
    assert not (tmp_path / "d").exists()


def test_a_refused_pickle_is_not_answered_with_advice_to_unpickle_it():
    from dqo_megatron.checkpoint_integrity import one_line

    torch_text = (
        "Weights only load failed. This file can still be loaded, to do so you have two options, do those "
        "steps only if you trust the source of the checkpoint.\n (1) In PyTorch 2.6, we changed the default "
        "value of the `weights_only` argument in `torch.load` from `False` to `True`. Re-running `torch.load` "
        "with `weights_only` set to `False` will likely succeed"
    )
    line = one_line(pickle.UnpicklingError(torch_text))
    assert "weights_only=True" in line and "refuses" in line and "set to `False`" not in line and "\n" not in line


def test_problem_files_name_the_bad_line(tmp_path):
    from dqo_megatron.tasks.datasets import load_problems

    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n" + '{"question": "x\\ud800", "answer": "#### 2"}\n'
    )
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
    with pytest.raises(
        ValueError,
        match="token id 600 is beyond tokenizer .* \\(vocabulary 512\\): the tokenizer does not match the model",
    ):
        tok.decode([5, 600])


def test_a_completion_cache_is_never_someone_elses_file(tmp_path):
    from dqo_megatron.outputs import OutputError
    from dqo_megatron.process_scores import CompletionCache, ProcessScoresConfig, check_outputs

    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for cache in (model / "config.json", tmp_path / "out.jsonl"):
        cfg = ProcessScoresConfig(
            inputs=[str(inp)], output=str(tmp_path / "out.jsonl"), model_id=str(model), cache=str(cache), progress=False
        )
        with pytest.raises(OutputError, match="refused even with --overwrite"):
            check_outputs(cfg)
    records = tmp_path / "scored.jsonl"
    records.write_text(json.dumps({"prompt": "p", "response": "r", "reward": 1}) + "\n")
    before = records.read_bytes()
    with pytest.raises(ValueError, match="scored.jsonl: not a completion cache"):
        CompletionCache(str(records))
    assert records.read_bytes() == before
    (tmp_path / "cache.jsonl").write_text(json.dumps({"key": "k", "texts": ["a"]}) + "\n" + '{"key": "torn')
    assert CompletionCache(str(tmp_path / "cache.jsonl")).get("k") == ["a"]  # a torn last line: still a cache


def test_a_model_replaced_in_place_gets_another_cache_key(tmp_path):
    from dqo_megatron.rollout.identity import identity_tag

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    first = identity_tag(str(model))
    assert first.startswith(f"{model}@") and identity_tag(str(model)) == first
    (model / "model.safetensors").write_bytes(b"\1" * 1000)
    assert identity_tag(str(model)) != first
    assert identity_tag("stub-model") == "stub-model"  # not a path: the name as given


def test_value_analysis_refuses_to_replace_earlier_results(tmp_path, sp_model):
    from dqo_megatron.analysis.value_analysis import RESULTS_FILE, ValueAnalysisConfig, run_value_analysis
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
    from dqo_megatron.outputs import OutputError

    out = tmp_path / "va"
    out.mkdir()
    (out / RESULTS_FILE).write_text("earlier\n")
    cfg = ValueAnalysisConfig(
        checkpoints=[str(tmp_path / "ck")],
        records=[str(tmp_path / "r.jsonl")],
        out_dir=str(out),
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=sp_model)),
    )
    with pytest.raises(OutputError, match="an earlier analysis in .* already exists .*--overwrite"):
        run_value_analysis(cfg)
    assert (out / RESULTS_FILE).read_text() == "earlier\n"


def test_export_and_config_misuse(tmp_path):
    r = runner.invoke(app, ["export", str(tmp_path / "ck"), str(tmp_path / "o"), "--format", "megatron", "--verify"])
    _one_line_error(r, "--verify compares the written HF model", "--format hf")
    garbage = tmp_path / "c.yaml"
    garbage.write_bytes(b"\x80\x81\x82 not yaml")
    r = runner.invoke(app, ["train", "-c", str(garbage)])
    _one_line_error(r, "c.yaml: not a YAML config")


def test_a_tokenizer_larger_than_the_model_is_not_shipped_with_it(hf_tok_dir):
    from pathlib import Path

    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.conversion.convert import check_tokenizer_fits

    check_tokenizer_fits(Path(hf_tok_dir), 512)  # 300 tokens in 512 rows: fine (padded vocabularies)
    with pytest.raises(ConversionError, match="has 300 tokens, the model 256: it does not belong to this model"):
        check_tokenizer_fits(Path(hf_tok_dir), 256)


def test_damaged_dataset_files_are_named(tmp_path, sp_model):
    from dqo_megatron.data.dataset import TrajectoryDataset

    rec = tmp_path / "r.jsonl"
    rec.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": "an answer", "reward": 1}) + "\n" for i in range(4))
    )
    prefix = tmp_path / "d" / "train"
    assert (
        runner.invoke(app, ["preprocess", str(rec), "-o", str(prefix), "-t", sp_model, "--no-progress"]).exit_code == 0
    )
    TrajectoryDataset(str(prefix))  # intact: opens
    files = {name: (tmp_path / "d" / name).read_bytes() for name in os.listdir(tmp_path / "d")}
    cases = [
        ("train_meta.idx", os.urandom(100), "train_meta.idx: not a Megatron index file"),
        ("train_tokens.bin", files["train_tokens.bin"][:-3], "train_tokens.bin: .* bytes, its index points to"),
        ("train.json", b"{", "train.json: not a dataset manifest"),
        ("train.json", b"[1]", "train.json: not a dataset manifest"),
    ]
    for name, damaged, message in cases:
        (tmp_path / "d" / name).write_bytes(damaged)
        with pytest.raises(ValueError, match=message):
            TrajectoryDataset(str(prefix))
        (tmp_path / "d" / name).write_bytes(files[name])
    (tmp_path / "d" / "train_ref_logprobs.idx").unlink()
    with pytest.raises(ValueError, match="train_ref_logprobs.idx is missing"):
        TrajectoryDataset(str(prefix))


def test_nonfinite_stored_rewards_are_refused_before_training(tmp_path, sp_model):
    import numpy as np

    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.data_check import check_data_matches_model

    rec = tmp_path / "r.jsonl"
    rec.write_text(
        "".join(json.dumps({"prompt": f"q{i}", "response": "an answer", "reward": 1}) + "\n" for i in range(4))
    )
    prefix = str(tmp_path / "train")
    assert runner.invoke(app, ["preprocess", str(rec), "-o", prefix, "-t", sp_model, "--no-progress"]).exit_code == 0
    rewards = np.memmap(prefix + "_rewards.bin", dtype=np.float32, mode="r+")
    rewards[-1] = np.nan
    rewards.flush()
    del rewards
    run = load_config(RunConfig, None, [f"data.train_prefix={prefix}", "model.vocab_size=512"])
    with pytest.raises(ConfigError, match=r"train_rewards.bin: document 3 \(from .*r.jsonl:4\) holds NaN or inf"):
        check_data_matches_model(TrajectoryDataset(prefix), run, log=False)


def test_settings_that_cannot_mean_anything(tmp_path):
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.demo.config import DemoConfig

    for bad in ("train.lr=inf", "train.lr=nan", "value.lr=-inf", "train.clip_grad=.inf"):
        with pytest.raises(ConfigError, match="expected a finite number"):
            load_config(RunConfig, None, [bad])
    with pytest.raises(ConfigError, match="is a directory: give the YAML file"):
        load_config(RunConfig, tmp_path, [])
    with pytest.raises(ConfigError, match="--tp 3 --pp 1: the demo's model cannot be split"):
        DemoConfig(tp=3)
    r = runner.invoke(app, ["smoke", "--steps", "0"])
    _one_line_error(r, "steps=0: must be an integer >= 1")


def test_outputs_that_are_devices_are_refused(tmp_path):
    from dqo_megatron.outputs import OutputError, staged_file

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="is a device, pipe or socket"):
        with staged_file(fifo, overwrite=True):
            raise AssertionError("not reached")
    assert fifo.is_fifo()
    with pytest.raises(OutputError, match="is a device, pipe or socket"):
        with staged_file("/dev/null", overwrite=True):
            raise AssertionError("not reached")


def test_a_full_disk_names_the_output_not_the_working_directory(tmp_path):
    import errno

    from dqo_megatron.cli._app import describe
    from dqo_megatron.outputs import staged_file

    target = tmp_path / "full" / "out.jsonl"
    with pytest.raises(OSError) as info:
        with staged_file(target, overwrite=False):
            raise OSError(errno.ENOSPC, "No space left on device")  # what a failed write raises: no file name
    message, code = describe(info.value)
    assert code == 2 and f"no space left on device writing {target}" in message and "MiB free" in message


def _save_with_nan_weights(root: str) -> str:
    """One rank: the trainer's save of a model whose weights hold a NaN (as a huge LR leaves them)."""
    import torch

    from dqo_megatron.training.checkpointer import TrainingDiverged, _save

    torch.distributed.init_process_group("gloo")
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    try:
        _save(__import__("pathlib").Path(root), 3, [model], None, None, None, None)
    except TrainingDiverged as exc:
        return str(exc)
    return "saved"


def test_non_finite_weights_are_never_saved(tmp_path):
    from tests.helpers.distributed import run_distributed

    (message,) = run_distributed(_save_with_nan_weights, 1, str(tmp_path / "checkpoints"))
    assert "weights became non-finite (NaN/inf) by step 3: not saved" in message
    assert not (tmp_path / "checkpoints").exists()


def test_learning_rates_no_optimizer_survives(tmp_path):
    from dqo_megatron.config import ConfigError, RunConfig, load_config

    for bad in (["train.lr=1e35"], ["value.lr=2"], ["value.lr_ratio=1e41"], ["train.lr=1.0"]):
        with pytest.raises(ConfigError, match="above 1.0"):
            load_config(RunConfig, None, bad)
    # the value network's rate only matters to algorithms that have one
    load_config(RunConfig, None, ["algorithm=sft", "train.lr=1.0"])


def test_a_model_hf_dir_without_tokenizer_files_is_no_tokenizer(tmp_path, sp_model):
    from dqo_megatron.config import RunConfig, load_config
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.data_check import check_data_matches_model

    rec = tmp_path / "r.jsonl"
    rec.write_text(json.dumps({"prompt": "q", "response": "an answer", "reward": 1}) + "\n")
    prefix = str(tmp_path / "train")
    assert runner.invoke(app, ["preprocess", str(rec), "-o", prefix, "-t", sp_model, "--no-progress"]).exit_code == 0
    base = tmp_path / "base"
    (base / "hf").mkdir(parents=True)
    (base / "hf" / "config.json").write_text("{}")  # a converted model's hf/ may hold only its config
    run = load_config(RunConfig, None, [f"data.train_prefix={prefix}", "model.vocab_size=512", f"init.policy={base}"])
    (warning,) = check_data_matches_model(TrajectoryDataset(prefix), run, log=False)
    assert "the model comes with no tokenizer" in warning


def test_a_rollout_output_that_is_a_device_is_refused(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = runner.invoke(
        app,
        ["rollout", str(problems), "-o", str(fifo), "-m", str(tmp_path / "no-model"), "--overwrite", "--no-progress"],
    )
    _one_line_error(r, "is a device, pipe or socket")
    assert fifo.is_fifo() and sorted(os.listdir(tmp_path)) == ["p.jsonl", "pipe"]


def test_an_unreadable_common_pt_is_named(tmp_path):
    """common.pt is where megatron-core <= 0.16 keeps a checkpoint's common state (0.19 writes it inside
    the .distcp files but still reads the file from older checkpoints): a damaged one is named."""
    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.conversion.megatron_io import checked_load

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    (weights / "common.pt").write_text("one line of text\n")
    with pytest.raises(ConversionError, match=r"common.pt: unreadable"):
        checked_load({}, weights, verify="off")
