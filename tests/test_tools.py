"""tools/preprocess_data.py and tools/convert_checkpoint.py with Megatron-LM's flags write what our commands
write; the flags whose meaning differs are refused or noted in one line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqo_megatron.cli import app
from tests.data.conftest import hf_tok_dir, write_jsonl  # noqa: F401  (hf_tok_dir is a fixture)

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _same_files(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for name in names:
        if str(name) not in skip:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_preprocess_with_megatron_flags_writes_what_preprocess_writes(tmp_path, hf_tok_dir):  # noqa: F811
    rows = [{"prompt": f"Tom has {i} apples.", "response": f"#### {i}", "reward": float(i % 2)} for i in range(6)]
    src = write_jsonl(tmp_path / "r.jsonl", rows)
    ours = CliRunner().invoke(
        app, ["preprocess", src, "-o", str(tmp_path / "ours" / "d"), "-t", hf_tok_dir, "--no-progress"]
    )
    assert ours.exit_code == 0, ours.output
    proc = _run(
        "tools/preprocess_data.py",
        "--input",
        src,
        "--output-prefix",
        str(tmp_path / "megatron" / "d"),
        "--json-keys",
        "text",
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        hf_tok_dir,
        "--workers",
        "1",
        "--append-eod",
        "--no-progress",  # ours, passed through
    )
    assert (
        proc.stderr.count("note:") == 1 and "not " + str(tmp_path / "megatron" / "d") + "_text_document" in proc.stderr
    )
    _same_files(tmp_path / "ours", tmp_path / "megatron")


def test_preprocess_flags_that_mean_something_else_are_refused_in_one_line(tmp_path, capsys):
    tool = _tool("preprocess_data")
    base = ["--input", "r.jsonl", "--output-prefix", "d", "--tokenizer-model", str(tmp_path)]
    ours, notes = tool.to_our_args(base + ["--workers", "4", "--max-length", "64"])
    assert ours == ["r.jsonl", "-o", "d", "-t", str(tmp_path), "-j", "4", "--max-length", "64"] and len(notes) == 1
    for extra, said in [
        (["--json-keys", "question"], "records are read by their fields"),
        (["--tokenizer-type", "GPT2BPETokenizer"], "not supported"),
        (["--tokenizer-type", "SentencePieceTokenizer"], "is not a .model file"),
    ]:
        with pytest.raises(SystemExit) as exc:
            tool.main(base + extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and said in err and len(err.strip().splitlines()) == 1, err


def test_convert_with_megatron_flags_writes_what_convert_writes(tmp_path):
    from tests.conversion.ranks import tiny_hf_model

    tiny_hf_model("llama_gqa_untied").save_pretrained(tmp_path / "hf")
    hf, ours, theirs = str(tmp_path / "hf"), tmp_path / "ours", tmp_path / "megatron"
    _run("-m", "dqo_megatron", "convert", "hf-to-megatron", hf, str(ours), "--tp", "2")
    proc = _run(
        "tools/convert_checkpoint.py",
        "--model-type",
        "GPT",
        "--loader",
        "llama_mistral",
        "--saver",
        "mcore",
        "--load-dir",
        hf,
        "--save-dir",
        str(theirs),
        "--target-tensor-parallel-size",
        "2",
        "--target-pipeline-parallel-size",
        "1",
    )
    assert "note: the checkpoint is layout-free" in proc.stderr
    # torch's .metadata names each save by a fresh id (and the manifest holds its CRC): the tensors must agree
    _same_files(ours, theirs, skip=("weights/.metadata", "weights/MANIFEST.json"))

    _run("-m", "dqo_megatron", "convert", "megatron-to-hf", str(ours), str(tmp_path / "ours_hf"), "--dtype", "bf16")
    args = ["--loader", "mcore", "--saver", "hf", "--load-dir", str(ours), "--save-dir", str(tmp_path / "megatron_hf")]
    proc = _run("tools/convert_checkpoint.py", *args, "--bf16", "--target-tensor-parallel-size", "4")
    assert "note: the target TP/PP are ignored" in proc.stderr
    _same_files(tmp_path / "ours_hf", tmp_path / "megatron_hf")


def test_convert_flag_mapping_and_refusals():
    tool = _tool("convert_checkpoint")
    ours, notes = tool.to_our_args(
        ["--loader", "hf", "--saver", "megatron", "--load-dir", "a", "--save-dir", "b", "--fp16", "--verify"]
    )
    assert ours == ["hf-to-megatron", "a", "b", "--dtype", "fp16", "--verify"] and notes == []
    ours, notes = tool.to_our_args(
        ["--loader", "mcore", "--saver", "llama_mistral", "--load-dir", "a", "--save-dir", "b"]
        + ["--tokenizer-model", "tok", "--megatron-path", "/m", "--no-checking"]
    )
    assert ours == ["megatron-to-hf", "a", "b", "--tokenizer", "tok"]
    assert notes == ["ignored: --megatron-path, --no-checking (read from config.json, or not needed here)"]
    for argv, said in [
        (["--loader", "mcore", "--saver", "mcore"], "no resharding step"),
        (["--loader", "hf", "--saver", "mcore", "--model-type", "BERT"], "only GPT models"),
        (["--loader", "mixtral_hf", "--saver", "mcore"], "--loader mixtral_hf: choose one of"),
        (["--loader", "hf", "--saver", "mcore", "--checkpoint-type", "meta"], "not read"),
    ]:
        with pytest.raises(SystemExit) as exc:
            tool.to_our_args(argv + ["--load-dir", "a", "--save-dir", "b"])
        assert exc.value.code == 2, said


def _help(tool, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        tool.main(list(args))
    assert exc.value.code == 0


def test_tools_keep_our_own_arguments_and_show_both_helps(capsys):
    for name, words in [
        ("preprocess_data", ["--output-prefix", "--append-eod", "_text_document", "--tokenizer"]),
        ("convert_checkpoint", ["--target-tensor-parallel-size", "layout-free", "hf-to-megatron"]),
    ]:
        _help(_tool(name), "--help")
        out = capsys.readouterr().out
        assert all(w in out for w in words), (name, out)
    _help(_tool("convert_checkpoint"), "hf-to-megatron", "--help")
    assert "--value-head" in capsys.readouterr().out
