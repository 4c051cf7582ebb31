"""Checkpoints across megatron-core releases (issue #20): this interpreter and $DQO_OTHER_MEGATRON_PYTHON
(`make test-compat` sets it to the default leg's .venv: 0.16.1 beside the leg's 0.19.2).

A newer megatron-core reads what an older one wrote (0.19 reads 0.16's common.pt); the reverse is not
promised and does not hold (0.16-0.18 need common.pt, which 0.19 no longer writes). So the older release
writes (a) the tiny shared Llama converted from HF and (b) the checkpoints of a 4-step DQO run; the newer
reads them: the weights it exports are bit-equal to the ones the older exports from the same files, and it
resumes the run from step 2 with the older's losses of steps 3-4. The newer writes both kinds too; the older
refuses them with one line naming the cause. Every step is a `dqo-megatron` command in its own process.

The tests of `newer_format_problem` itself run in every leg (no second interpreter needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.test_trainer_resume import _config, _losses

OTHER_ENV = "DQO_OTHER_MEGATRON_PYTHON"
REPO = Path(__file__).resolve().parents[1]
NEWER_FORMAT = "was written by a newer megatron-core"


def _fake_newer_checkpoint(path: Path) -> Path:
    """A torch_dist directory as 0.19 writes it, as far as the format probe looks: the common state under
    its ShardedObject key inside the files, metadata.json, no common.pt."""
    import torch.distributed.checkpoint as dcp

    from dqo_megatron.compat.megatron_api import COMMON_STATE_KEY_PREFIX

    dcp.save({f"{COMMON_STATE_KEY_PREFIX}shard_0_1": torch.zeros(2)}, checkpoint_id=str(path), no_dist=True)
    (path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    return path


def test_the_newer_format_is_named_only_where_this_release_cannot_read_it(tmp_path):
    from dqo_megatron.compat.megatron_api import megatron_version, newer_format_problem, reads_common_state_in_files

    newer = _fake_newer_checkpoint(tmp_path / "newer")
    problem = newer_format_problem(newer)
    if reads_common_state_in_files():
        assert problem is None
    else:
        assert NEWER_FORMAT in problem and f"this megatron-core {megatron_version()} cannot read it" in problem
        assert "\n" not in problem
    (newer / "common.pt").write_bytes(b"")  # common.pt beside the files: the old format (damaged or not)
    assert newer_format_problem(newer) is None
    assert newer_format_problem(tmp_path / "absent") is None


def test_the_load_paths_report_the_newer_format_as_the_cause(tmp_path):
    from dqo_megatron.compat.megatron_api import reads_common_state_in_files
    from dqo_megatron.conversion.megatron_io import checked_load
    from dqo_megatron.conversion.registry import ConversionError
    from dqo_megatron.training.checkpointing import _reader_failure

    if reads_common_state_in_files():
        pytest.skip("this megatron-core reads both formats (the refusal is tested under an older one)")
    newer = _fake_newer_checkpoint(tmp_path / "newer")
    with pytest.raises(ConversionError, match=NEWER_FORMAT) as raised:
        checked_load({}, newer, verify="off")
    assert "reader failed" not in str(raised.value)
    message, damaged = _reader_failure(newer, AttributeError("'str' object has no attribute 'iterdir'"))
    assert NEWER_FORMAT in message and not damaged


# ------------------------------------------------------------------------- two interpreters
def _run(python: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _dqo(python: str, *args: str) -> subprocess.CompletedProcess:
    return _run(python, "-m", "dqo_megatron", *args)


def _ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{done.args}: rc {done.returncode}\n{done.stderr[-3000:]}"
    return done


def _release(python: str) -> dict:
    probe = "from dqo_megatron.compat.megatron_api import megatron_version as v, reads_common_state_in_files as r; "
    done = _ok(_run(python, "-c", probe + "print(v(), r())"))
    version, reads = done.stdout.split()[-2:]
    return {"python": python, "version": version, "reads_newer": reads == "True"}


@pytest.fixture(scope="module")
def releases():
    """``(older, newer)``: each a dict of python, version, reads_newer."""
    from packaging.version import Version

    other = os.environ.get(OTHER_ENV)
    if not other:
        pytest.skip(f"{OTHER_ENV} is not set (make test-compat sets it to the other leg's interpreter)")
    assert Path(other).is_file(), f"{OTHER_ENV}={other} does not exist"
    pair = sorted([_release(sys.executable), _release(other)], key=lambda r: Version(r["version"]))
    if pair[0]["version"] == pair[1]["version"]:
        pytest.skip(f"both interpreters have megatron-core {pair[0]['version']}")
    return tuple(pair)


def _same_safetensors(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(left) == sorted(right)
    for name in left:
        assert left[name].dtype == right[name].dtype and torch.equal(left[name], right[name]), name


def _refused_as_newer(done: subprocess.CompletedProcess, older: dict) -> None:
    assert done.returncode == 2, f"rc {done.returncode}\n{done.stderr[-3000:]}"
    last = done.stderr.strip().splitlines()[-1]
    assert NEWER_FORMAT in last and f"this megatron-core {older['version']} cannot read it" in last, last


@pytest.fixture(scope="module")
def converted(releases, shared_data, tmp_path_factory):
    """The shared stories260K Llama as HF, converted to a Megatron checkpoint by each release."""
    from tests.conversion.llama2c import llama2c_to_hf

    model_dir = shared_data / "models" / "stories260K"
    if not (model_dir / "stories260K.bin").is_file():
        pytest.skip(f"{model_dir}/stories260K.bin not found in the shared data")
    root = tmp_path_factory.mktemp("cross_version_convert")
    llama2c_to_hf(model_dir / "stories260K.bin", root / "hf", model_dir / "tok512.model")
    for name, release in zip(("older", "newer"), releases):
        _ok(_dqo(release["python"], "convert", "hf-to-megatron", str(root / "hf"), str(root / name)))
    return root


def test_newer_reads_the_older_converted_checkpoint_bit_equal(releases, converted):
    older, newer = releases
    for name, release in (("by_older", older), ("by_newer", newer)):
        _ok(_dqo(release["python"], "convert", "megatron-to-hf", str(converted / "older"), str(converted / name)))
    _same_safetensors(converted / "by_older", converted / "by_newer")


def test_older_refuses_the_newer_converted_checkpoint_naming_the_cause(releases, converted):
    older, _newer = releases
    done = _dqo(older["python"], "convert", "megatron-to-hf", str(converted / "newer"), str(converted / "back"))
    if older["reads_newer"]:
        _ok(done)
    else:
        _refused_as_newer(done, older)


@pytest.fixture(scope="module")
def trained(releases, tmp_path_factory):
    """A 4-step DQO run of the older release (checkpoints at steps 2 and 4), resumed from step 2 by the newer."""
    from tests.helpers.synthetic_data import write_synthetic_dataset

    older, newer = releases
    tmp = tmp_path_factory.mktemp("cross_version_train")
    dataset = write_synthetic_dataset(str(tmp / "data" / "train"), docs=12, max_len=33)
    _ok(_dqo(older["python"], "train", "--config", str(_config(tmp, dataset, tmp / "older", steps=4))))
    step2 = tmp / "older" / "checkpoints" / "step_00000002"
    resumed = _ok(_dqo(newer["python"], "train", "--config", str(_config(tmp, dataset, tmp / "newer", steps=4)),
                       "--resume", str(step2)))  # fmt: skip
    return tmp, dataset, step2, resumed


def test_newer_resumes_the_older_training_checkpoint(trained):
    tmp, _dataset, step2, resumed = trained
    assert "resumed from" in resumed.stderr and str(step2) in resumed.stderr
    older, newer = _losses(tmp / "older"), _losses(tmp / "newer")
    assert sorted(newer) == [3, 4], sorted(newer)
    for step in (3, 4):
        assert newer[step] == older[step], f"step {step}: {newer[step]!r} (resumed) != {older[step]!r}"


def test_newer_reads_the_older_training_weights_bit_equal(releases, trained):
    tmp, _dataset, step2, _resumed = trained
    for name, release in zip(("export_by_older", "export_by_newer"), releases):
        _ok(_dqo(release["python"], "export", str(step2), str(tmp / name)))
    _same_safetensors(tmp / "export_by_older", tmp / "export_by_newer")


def test_older_refuses_the_newer_training_checkpoint_naming_the_cause(releases, trained):
    older, _newer = releases
    tmp, dataset, _step2, _resumed = trained
    step4 = tmp / "newer" / "checkpoints" / "step_00000004"
    config = _config(tmp, dataset, tmp / "back", steps=6)
    done = _dqo(older["python"], "train", "--config", str(config), "--resume", str(step4))
    if older["reads_newer"]:
        _ok(done)
    else:
        _refused_as_newer(done, older)
