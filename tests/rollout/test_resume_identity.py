"""A rollout resumes only with the model that began it: the sidecar records the model's identity (config,
tokenizer, sampled weight bytes), so a model directory that changed under the same path is refused with
what changed and how to go on, a model that only moved is accepted, and outputs begun before identities
were recorded resume with a warning. The output is left intact by a refusal."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from dqo_megatron.config import ConfigError
from dqo_megatron.rollout import identity as identity_module
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.identity import model_identity
from dqo_megatron.rollout.rollout import run_rollout
from tests.eval.stubs import StubBackend
from tests.rollout.conftest import write_problems


def _model_dir(path: Path, weights_seed: int = 0, size: int = 3 << 20) -> str:
    """An HF-looking model directory (nothing loads it: the stub backend generates)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (path / "tokenizer.json").write_text('{"model": {"vocab": "a b c"}}')
    (path / "model.safetensors").write_bytes(bytes((weights_seed + i) % 251 for i in range(size)))
    return str(path)


def _cfg(problems: str, output: Path, model: str, **kw) -> RolloutConfig:
    return RolloutConfig(problems=problems, output=str(output), model=model, n=2, progress=False, **kw)


def _stub() -> StubBackend:
    return StubBackend(lambda prompt, prefix, seed, j, params: f"answer {seed % 97} {j}")


@pytest.fixture
def problems(tmp_path) -> str:
    return write_problems(tmp_path / "problems.jsonl", ["one", "two", "three"])


def _begin(problems: str, out: Path, model: str, keep: int = 2) -> bytes:
    """A run stopped after `keep` of the 3 problems (n = 2 lines each): the whole run, cut back. Returns
    the file's bytes."""
    run_rollout(_cfg(problems, out, model), _stub())
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[: 2 * keep]))
    return out.read_bytes()


def test_a_changed_model_directory_is_refused_and_the_output_kept(tmp_path, problems):
    model = _model_dir(tmp_path / "model")
    out = tmp_path / "out.jsonl"
    before = _begin(problems, out, model)
    stored = json.loads(Path(str(out) + ".meta.json").read_text())["settings"]["model_identity"]
    assert stored == model_identity(model) and stored["files"] == 3
    # a newer fine-tune written over the same directory: same names, same sizes, other bytes
    shutil.rmtree(model)
    _model_dir(tmp_path / "model", weights_seed=1)
    with pytest.raises(ConfigError) as info:
        run_rollout(_cfg(problems, out, model), _stub())
    msg = str(info.value)
    assert f"{out} was made by another model: {model}" in msg
    assert "its weights changed (config, tokenizer the same)" in msg and "mix two policies" in msg
    assert "new output (-o)" in msg and "--overwrite" in msg
    assert out.read_bytes() == before
    # the config alone
    shutil.rmtree(model)
    _model_dir(tmp_path / "model")
    (Path(model) / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 128}))
    with pytest.raises(ConfigError, match=r"its config changed \(weights, tokenizer the same\)"):
        run_rollout(_cfg(problems, out, model), _stub())
    assert out.read_bytes() == before


def test_the_same_model_resumes_even_moved(tmp_path, problems):
    model = _model_dir(tmp_path / "model")
    out = tmp_path / "out.jsonl"
    before = _begin(problems, out, model)
    moved = str(tmp_path / "elsewhere" / "model")
    shutil.copytree(model, moved)
    (Path(moved) / "README.md").write_text("notes do not change a model")
    summary = run_rollout(_cfg(problems, out, moved), _stub())
    assert summary.resumed_problems == 2 and summary.generated_problems == 1
    assert out.read_bytes().startswith(before)


def test_an_output_begun_before_identities_resumes_with_a_warning(tmp_path, problems, caplog):
    model = _model_dir(tmp_path / "model")
    out = tmp_path / "old.jsonl"
    _begin(problems, out, model)
    meta = Path(str(out) + ".meta.json")
    header = json.loads(meta.read_text())
    del header["settings"]["model_identity"]  # as written before this check existed
    meta.write_text(json.dumps(header))
    with caplog.at_level(logging.WARNING, logger="dqo_megatron.rollout.rollout"):
        summary = run_rollout(_cfg(problems, out, model), _stub())
    assert summary.resumed_problems == 2 and summary.generated_problems == 1
    assert any("before rollout recorded the model's identity" in r.getMessage() for r in caplog.records)


def test_identity_reads_a_bounded_sample_of_large_weights(tmp_path, monkeypatch):
    """A large weight file costs SAMPLE_BLOCKS reads of SAMPLE_BYTES, and any retraining (all bytes
    change) changes the identity; a file's size and name are part of it too."""
    model = _model_dir(tmp_path / "model", size=8 << 20)
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

    monkeypatch.setattr(identity_module, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    first = model_identity(model)
    monkeypatch.undo()
    assert sum(reads) <= identity_module.SAMPLE_BLOCKS * identity_module.SAMPLE_BYTES + (1 << 20)
    retrained = _model_dir(tmp_path / "retrained", weights_seed=7, size=8 << 20)
    assert model_identity(retrained)["weights"] != first["weights"]
    assert model_identity(retrained)["config"] == first["config"]
    (Path(retrained) / "model.safetensors").unlink()
    shard = Path(retrained) / "model-00001-of-00001.safetensors"
    shard.write_bytes((Path(model) / "model.safetensors").read_bytes())
    assert model_identity(retrained)["weights"] != first["weights"]  # renamed: another index
    assert model_identity(str(tmp_path / "missing")) is None


def test_how_a_lone_tokenizer_model_is_read_is_part_of_the_identity(tmp_path, monkeypatch):
    """A directory whose only tokenizer file is tokenizer.model is read with sentencepiece (before
    2026-12-06: with transformers, other prompt ids): its identity says so, so completions cached under
    the old reading are not resumed as this model's; a directory read as HF keeps its identity."""
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "tokenizer.model").write_bytes(b"pieces")
    (lone / "model.safetensors").write_bytes(b"weights")
    now = model_identity(lone)
    monkeypatch.setattr(identity_module, "tokenizer_kind", lambda path: "hf")  # the old reading
    assert model_identity(lone)["tokenizer"] != now["tokenizer"]
    assert model_identity(lone)["weights"] == now["weights"]
    model = tmp_path / "model"  # the tokenizer given apart from the model: the same rule
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    old = model_identity(model, tokenizer=lone)
    monkeypatch.undo()
    assert model_identity(model, tokenizer=lone)["tokenizer"] != old["tokenizer"]
