"""Conversion checkpoints carry the same manifest as training checkpoints (`checkpoint_integrity`):
written by `save_chunks`, checked by `load_chunks`. A damaged ``weights/`` file is a ConversionError
naming it (nothing written); a directory from before manifests still loads; a full disk during the
save is named and leaves no output."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from dqo_megatron.checkpoint_integrity import MANIFEST_FILE, file_crc32
from tests.conversion.ranks import _allow_children, convert_rank, tiny_hf_model
from tests.helpers.distributed import run_distributed


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    tiny_hf_model("llama_gqa_untied").save_pretrained(root / "hf")
    run_distributed(convert_rank, 1, str(root / "hf"), str(root / "meg"))
    return root


def test_save_chunks_writes_a_manifest_of_every_weights_file(converted):
    weights = converted / "meg" / "weights"
    manifest = json.loads((weights / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {p.name for p in weights.iterdir()} - {MANIFEST_FILE}
    for name, entry in manifest["files"].items():
        size, crc = file_crc32(weights / name)
        assert entry == {"size": size, "crc32": f"{crc:08x}"}, name


def _to_hf_each(cases: dict) -> dict:
    """megatron_to_hf of each {name: (checkpoint dir, out dir)}: "ok" or the ConversionError's message."""
    _allow_children()
    from dqo_megatron.conversion import ConversionError, megatron_to_hf

    found = {}
    for name, (src, out) in cases.items():
        try:
            megatron_to_hf(src, out, progress=False)
            found[name] = "ok"
        except ConversionError as err:
            found[name] = str(err)
    return found


def test_damaged_weights_are_named_and_nothing_is_written(converted, tmp_path):
    cases, damaged = {}, {}
    for name in ("truncated", "flipped", "deleted", "legacy", "legacy_truncated"):
        src = tmp_path / name
        shutil.copytree(converted / "meg", src)
        target = src / "weights" / "__0_0.distcp"
        if name.startswith("legacy"):
            (src / "weights" / MANIFEST_FILE).unlink()
        if name in ("truncated", "legacy_truncated"):
            os.truncate(target, target.stat().st_size // 2)
        elif name == "flipped":
            with open(target, "r+b") as f:
                f.seek(target.stat().st_size // 2)
                f.write(b"\xff" * 8)
        elif name == "deleted":
            target.unlink()
        cases[name] = (str(src), str(tmp_path / f"out_{name}"))
        damaged[name] = target
    (found,) = run_distributed(_to_hf_each, 1, cases)
    assert found["legacy"] == "ok"  # written before manifests: still loads (with a warning)
    words = {
        "truncated": "the manifest says",
        "flipped": "checksum",
        "deleted": "missing",
        "legacy_truncated": "torch's .metadata needs at least",
    }
    for name, word in words.items():
        assert f"{damaged[name]}: " in found[name] and word in found[name], (name, found[name])
        assert "\n" not in found[name]
        assert not Path(cases[name][1]).exists()


def _load_unchecked(meg_dir: str) -> str:
    """load_chunks with verify="off" of a truncated checkpoint: torch's reader error, in one line."""
    _allow_children()
    import torch

    from dqo_megatron import parallel
    from dqo_megatron.config import ParallelConfig
    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.conversion.megatron_io import build_empty_chunks, load_chunks, read_metadata

    cfg, _ = read_metadata(meg_dir)
    parallel.initialize(ParallelConfig())
    chunks = build_empty_chunks(cfg, ParallelConfig(), torch.float32)
    try:
        load_chunks(chunks, Path(meg_dir) / "weights", verify="off")
    except ConversionError as err:
        return str(err)
    return "loaded"


def test_torch_reader_errors_are_one_line_naming_the_file(converted, tmp_path):
    src = tmp_path / "meg"
    shutil.copytree(converted / "meg", src)
    target = src / "weights" / "__0_1.distcp"
    os.truncate(target, target.stat().st_size // 2)
    (message,) = run_distributed(_load_unchecked, 1, str(src))
    assert "torch's checkpoint reader failed" in message and f"{target}: " in message and "\n" not in message


def _convert_on_a_full_disk(hf_dir: str, out: str) -> str:
    _allow_children()
    import torch.distributed.checkpoint.filesystem as torch_fs
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from dqo_megatron.conversion import ConversionError

    def enospc(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Megatron's writer (a process or a thread per file) calls torch's _write_item, imported by name
    filesystem_async._write_item = torch_fs._write_item = enospc
    try:
        convert_rank(hf_dir, out)
    except ConversionError as err:
        return str(err)
    return "converted"


def test_a_full_disk_during_conversion_is_named_and_leaves_nothing(converted, tmp_path):
    (message,) = run_distributed(_convert_on_a_full_disk, 1, str(converted / "hf"), str(tmp_path / "out"))
    assert "no space left on device writing" in message and "MiB free" in message, message
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())
