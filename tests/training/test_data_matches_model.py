"""The trainer and `annotate` refuse a dataset that does not belong to the model: a larger vocabulary,
token ids outside the model's, a tokenizer whose files differ from the model's (its checkpoint's hf/ or
eval.tokenizer); data.allow_tokenizer_mismatch lets a user who knows through (never for ids outside the
vocabulary); a manifest without a tokenizer hash gives a warning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqo_megatron.config import ConfigError, DataConfig, InitConfig, ModelConfig, RunConfig, TrainEvalConfig
from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.tokenize import tokenizer_fingerprint
from dqo_megatron.training.data_check import check_data_matches_model
from tests.helpers.synthetic_data import write_synthetic_dataset


def _tokenizer_dir(path: Path, vocab: str) -> str:
    """A tokenizer directory as far as the identity hash goes (its files; nothing loads them here)."""
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return str(path)


def _dataset(tmp: Path, vocab: int = 256, tokenizer_dir: str | None = None, manifest_vocab: int | None = None) -> str:
    prefix = write_synthetic_dataset(str(tmp / "data" / "train"), docs=8, vocab=vocab, max_len=17)
    manifest = json.loads(Path(prefix + ".json").read_text())
    if tokenizer_dir is not None:  # what preprocess records
        manifest["tokenizer"] = {
            "name": Path(tokenizer_dir).name,
            "kind": "hf",
            "eos_id": 2,
            "bos_id": 1,
            **tokenizer_fingerprint(tokenizer_dir),
        }
    if manifest_vocab is not None:
        manifest["vocab_size"] = manifest_vocab
    Path(prefix + ".json").write_text(json.dumps(manifest))
    return prefix


def _run(
    prefix: str, vocab: int = 256, policy: str | None = None, eval_tokenizer: str | None = None, **data
) -> RunConfig:
    return RunConfig(
        model=ModelConfig(vocab_size=vocab),
        data=DataConfig(train_prefix=prefix, **data),
        init=InitConfig(policy=policy),
        eval=TrainEvalConfig(tokenizer=eval_tokenizer),
    )


def _checkpoint_with(tmp: Path, tokenizer_dir: str) -> str:
    """A checkpoint directory whose hf/ holds a copy of the tokenizer files (what `convert` writes)."""
    shutil.copytree(tokenizer_dir, tmp / "ckpt" / "hf")
    (tmp / "ckpt" / "hf" / "config.json").write_text("{}")
    return str(tmp / "ckpt")


def test_a_larger_vocabulary_is_refused_with_both_numbers(tmp_path):
    prefix = _dataset(tmp_path, vocab=300)
    ds = TrajectoryDataset(prefix)
    with pytest.raises(ConfigError) as info:
        check_data_matches_model(ds, _run(prefix, vocab=256))
    msg = str(info.value)
    assert f"{prefix}.json" in msg and "has 300 tokens" in msg and "the model 256" in msg
    assert "data.allow_tokenizer_mismatch" in msg
    # allowed, every stored id is still checked: ids >= 256 are there, named with their document and source
    with pytest.raises(
        ConfigError,
        match=r"document \d+ \(from .*\) holds token id (2[5-9]\d), outside the model's "
        r"vocabulary \(model.vocab_size=256",
    ):
        check_data_matches_model(ds, _run(prefix, vocab=256, allow_tokenizer_mismatch=True))
    # the model that fits: only the warning that it has no tokenizer to compare with
    (warning,) = check_data_matches_model(ds, _run(prefix, vocab=300))
    assert "the model comes with no tokenizer" in warning


def test_allowed_larger_vocabulary_whose_ids_fit_is_a_warning(tmp_path):
    prefix = _dataset(tmp_path, vocab=256, manifest_vocab=260)
    ds = TrajectoryDataset(prefix)
    with pytest.raises(ConfigError, match="has 260 tokens, the model 256"):
        check_data_matches_model(ds, _run(prefix))
    allowed, no_tokenizer = check_data_matches_model(ds, _run(prefix, allow_tokenizer_mismatch=True))
    assert "allowed by data.allow_tokenizer_mismatch" in allowed and "comes with no tokenizer" in no_tokenizer


def test_ids_beyond_the_model_are_refused_even_when_the_manifest_says_they_fit(tmp_path):
    """A manifest can lie (hand-edited, mixed files); the token file itself is scanned."""
    prefix = _dataset(tmp_path, vocab=256, manifest_vocab=100)
    with pytest.raises(ConfigError, match=r"holds token id \d+, outside the model's vocabulary \(model.vocab_size=100"):
        check_data_matches_model(TrajectoryDataset(prefix), _run(prefix, vocab=100))


def test_pad_id_outside_the_vocabulary_is_refused(tmp_path):
    prefix = _dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"data.pad_id=256 is not a token id of the model \(model.vocab_size=256\)"):
        check_data_matches_model(TrajectoryDataset(prefix), _run(prefix, pad_id=256))


def test_the_tokenizer_must_be_the_models(tmp_path):
    ours = _tokenizer_dir(tmp_path / "tok-a", "a b c")
    prefix = _dataset(tmp_path, tokenizer_dir=ours)
    ds = TrajectoryDataset(prefix)
    before = Path(prefix + ".json").read_bytes()
    same_ckpt = _checkpoint_with(tmp_path / "same", ours)
    assert check_data_matches_model(ds, _run(prefix, policy=same_ckpt, eval_tokenizer=ours)) == []
    # the model's checkpoint carries another tokenizer (same vocabulary size: nothing else would notice)
    other = _tokenizer_dir(tmp_path / "tok-b", "a b d")
    other_ckpt = _checkpoint_with(tmp_path / "other", other)
    with pytest.raises(ConfigError) as info:
        check_data_matches_model(ds, _run(prefix, policy=other_ckpt))
    msg = str(info.value)
    assert "tok-a" in msg and f"init.policy: {other_ckpt}/hf" in msg and "tokenizer.json differ" in msg
    assert "data.allow_tokenizer_mismatch=true" in msg
    with pytest.raises(ConfigError, match=r"eval.tokenizer: .*tok-b.*tokenizer.json differ"):
        check_data_matches_model(ds, _run(prefix, eval_tokenizer=other))
    (warning,) = check_data_matches_model(ds, _run(prefix, policy=other_ckpt, allow_tokenizer_mismatch=True))
    assert "tokenizer.json differ" in warning and "allowed by data.allow_tokenizer_mismatch" in warning
    assert Path(prefix + ".json").read_bytes() == before  # the check only reads


def test_data_read_from_a_lone_tokenizer_model_as_hf_is_refused(tmp_path):
    """A directory whose only tokenizer file is tokenizer.model was read with transformers before
    2026-12-06 (the manifest says kind "hf") and is read with sentencepiece now: the same files, other
    prompt ids. The data must be preprocessed again; a file path read as sentencepiece then is fine."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "tokenizer.model").write_bytes(b"not parsed by the check")
    prefix = _dataset(tmp_path, tokenizer_dir=str(lone))  # records kind "hf", as the old rule did
    ds = TrajectoryDataset(prefix)
    with pytest.raises(ConfigError, match=r"read with sentencepiece now .*preprocess the data"):
        check_data_matches_model(ds, _run(prefix, eval_tokenizer=str(lone)))
    manifest = json.loads(Path(prefix + ".json").read_text())
    manifest["tokenizer"]["kind"] = "sentencepiece"  # preprocessed again (or from the .model file itself)
    Path(prefix + ".json").write_text(json.dumps(manifest))
    assert check_data_matches_model(TrajectoryDataset(prefix), _run(prefix, eval_tokenizer=str(lone))) == []
    # the export's pairing stays accepted: data from the .model file, a model whose hf/ holds that
    # tokenizer.model and the tokenizer.json converted from it (read as HF: the same ids by construction)
    exported = tmp_path / "exported"
    shutil.copytree(lone, exported)
    (exported / "tokenizer.json").write_text("{}")
    assert check_data_matches_model(TrajectoryDataset(prefix), _run(prefix, eval_tokenizer=str(exported))) == []


def test_an_old_manifest_without_a_hash_is_a_warning(tmp_path):
    prefix = _dataset(tmp_path)  # "tokenizer": "synthetic", as manifests before the hash only had a name
    tok = _tokenizer_dir(tmp_path / "tok", "a b c")
    (warning,) = check_data_matches_model(TrajectoryDataset(prefix), _run(prefix, eval_tokenizer=tok))
    assert "records no tokenizer hash" in warning and "'synthetic'" in warning and "preprocess again" in warning
    # a model without any tokenizer: nothing to compare, and the warning says so
    (warning,) = check_data_matches_model(TrajectoryDataset(prefix), _run(prefix))
    assert "the model comes with no tokenizer" in warning and "only the vocabulary size and the token ids" in warning


def _train(run: RunConfig):
    from dqo_megatron.training.trainer import train

    return train(run)


def _annotate(run: RunConfig):
    from dqo_megatron.training.annotate import annotate

    return annotate(run, progress=False)


def test_train_and_annotate_refuse_before_building_a_model(tmp_path):
    from tests.helpers.distributed import DistributedTestError, run_distributed

    prefix = _dataset(tmp_path, vocab=300)
    run = _run(prefix, vocab=256, policy=str(tmp_path / "no-such-checkpoint"))
    run.train.seq_length = run.model.seq_length = 32
    for body in (_train, _annotate):
        with pytest.raises(DistributedTestError, match=r"ConfigError: .*has 300 tokens, the model 256"):
            run_distributed(body, 1, run, timeout=120)
