"""`dqo-megatron preprocess` / `label`, tools/preprocess_data.py, and a DataLoader over the output."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from dqo_megatron.cli import app
from dqo_megatron.data.batching import DistributedTrajectorySampler, pad_collate
from dqo_megatron.data.dataset import TrajectoryDataset
from tests.data.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[2]


def _records(n=10, bad=True):
    rows = [
        {
            "prompt": f"Tom has {i} apples.",
            "response": f"He has {i} apples.\n#### {i}",
            "reward": float(i % 2),
            "prompt_id": f"q{i // 2}",
        }
        for i in range(n)
    ]
    if bad:
        rows.insert(3, '{"prompt": "x", "response": "", "reward": 1}')
    return rows


def test_cli_preprocess_skip_invalid(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "r.jsonl", _records())
    res = CliRunner().invoke(
        app,
        [
            "preprocess",
            src,
            "-o",
            str(tmp_path / "o" / "d"),
            "-t",
            sp_model,
            "-j",
            "2",
            "--skip-invalid",
            "--no-progress",
            "--max-length",
            "64",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "records read: 11, written: 10" in res.output and "empty_response: 1" in res.output
    ds = TrajectoryDataset(str(tmp_path / "o" / "d"))
    assert len(ds) == 10 and ds.prompt_ids == [f"q{i}" for i in range(5)]

    res = CliRunner().invoke(
        app, ["preprocess", src, "-o", str(tmp_path / "o2" / "d"), "-t", sp_model, "--no-progress"]
    )
    assert res.exit_code == 2
    assert "r.jsonl:4" in res.output and "empty_response" in res.output and "--skip-invalid" in res.output

    res = CliRunner().invoke(app, ["preprocess", src, "-o", str(tmp_path / "o3"), "-t", str(tmp_path / "none.model")])
    assert res.exit_code == 2 and "config error" in res.output and "does not exist" in res.output


def test_tools_script_same_output(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "r.jsonl", _records(bad=False))
    CliRunner().invoke(app, ["preprocess", src, "-o", str(tmp_path / "a" / "d"), "-t", sp_model, "--no-progress"])
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            src,
            "-o",
            str(tmp_path / "b" / "d"),
            "-t",
            sp_model,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_label_cli(tmp_path, shared_data):
    gsm = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8")][:20]
    math = [json.loads(line) for line in open(shared_data / "math" / "prm800k_split" / "test.jsonl", encoding="utf-8")][
        :20
    ]
    rows = []
    for i, r in enumerate(gsm):
        resp = r["answer"] if i % 2 == 0 else r["answer"].rsplit("####", 1)[0] + "#### 123456789"
        rows.append(
            {"prompt": r["question"], "response": resp, "reference_answer": r["answer"], "task": "gsm8k", "keep": i}
        )
    for i, r in enumerate(math):
        resp = r["solution"] if i % 2 == 0 else "I think it is \\boxed{\\text{something else}}"
        rows.append({"prompt": r["problem"], "response": resp, "reference_answer": r["answer"], "task": "math"})
    rows.append({"prompt": "p", "response": "#### 1", "task": "gsm8k"})  # no reference
    src = write_jsonl(tmp_path / "roll.jsonl", rows)
    out = tmp_path / "labeled.jsonl"
    res = CliRunner().invoke(app, ["label", src, "-o", str(out), "-j", "2", "--skip-invalid", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "labeled: 40" in res.output and "missing_field: 1" in res.output
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [g["correct"] for g in got] == [i % 2 == 0 for i in range(20)] * 2
    assert all(g["reward"] == float(g["correct"]) for g in got)
    assert got[1]["keep"] == 1 and got[1]["extracted_answer"] == "123456789"  # other fields kept
    res = CliRunner().invoke(app, ["label", src, "-o", str(tmp_path / "x.jsonl"), "--no-progress"])
    assert res.exit_code == 2 and "roll.jsonl:41" in res.output and "reference_answer" in res.output
    assert not (tmp_path / "x.jsonl").exists()


def test_dataloader_over_preprocessed(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "r.jsonl", _records(n=24, bad=False))
    CliRunner().invoke(app, ["preprocess", src, "-o", str(tmp_path / "d"), "-t", sp_model, "--no-progress"])
    ds = TrajectoryDataset(str(tmp_path / "d"))
    seen = []
    for rank in range(2):
        sampler = DistributedTrajectorySampler(len(ds), 3, rank, 2, seed=0)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=sampler,
            num_workers=1,
            collate_fn=functools.partial(pad_collate, pad_id=0, pad_to_multiple_of=8),
        )
        for batch in loader:
            assert batch["tokens"].shape[1] % 8 == 0
            assert (batch["rewards"].sum(1) == batch["outcome_reward"]).all()
            assert (batch["tokens"].gather(1, batch["lengths"][:, None] - 1) == 2).all()  # EOS last
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(24))
