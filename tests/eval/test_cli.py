"""`dqo-megatron process-scores` and `dqo-megatron eval` wiring (backends replaced by stubs; the real
tiny-model runs are in test_tiny_model.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dqo_megatron.cli import app
from tests.eval.stubs import StubBackend
from tests.process_scores.test_process_scores import ENDS, rows, stub_for, write_records

runner = CliRunner()


@pytest.fixture
def stub_factory(monkeypatch):
    """Replace the CLI's backend factory; returns the list of (kind, model, stub) built."""
    built = []

    def factory(kind, tokenizer, device, dtype, tensor_parallel, **options):
        def build(model):
            stub = stub_for({1: 2, 2: 0, 3: 0}) if "ps" in model else StubBackend(lambda *a: "#### 3\n\\boxed{3}")
            built.append((kind, model, stub))
            return stub

        return build

    monkeypatch.setattr("dqo_megatron.cli.eval._backend_factory", factory)
    return built


def test_process_scores_cli(tmp_path, stub_factory):
    inp = write_records(tmp_path / "in.jsonl", rows())
    out = tmp_path / "out.jsonl"
    r = runner.invoke(
        app,
        [
            "process-scores",
            inp,
            "-o",
            str(out),
            "-m",
            "ps-model",
            "-M",
            "4",
            "--assign",
            "every_correct",
            "--step-reward",
            "0.25",
            "--backend",
            "transformers",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "completions generated 12" in r.output and f"wrote {out}" in r.output
    rec = [json.loads(line) for line in open(out)][1]
    assert rec["process_rewards"] == [[ENDS[0], 0.25]] and rec["process_scores"]["prefix_correct"] == [2, 0, 0]
    ((kind, model, stub),) = stub_factory
    assert (kind, model, stub.closed) == ("transformers", "ps-model", True)
    # the cost without a model
    r = runner.invoke(
        app,
        [
            "process-scores",
            inp,
            "-o",
            str(tmp_path / "o2.jsonl"),
            "-m",
            "ps-model",
            "--dry-run",
            "--backend",
            "transformers",
        ],
    )
    assert r.exit_code == 0 and "x M=20: 60 completions to generate" in r.output and len(stub_factory) == 1


def test_process_scores_cli_errors(tmp_path, stub_factory):
    inp = write_records(tmp_path / "in.jsonl", rows())
    r = runner.invoke(app, ["process-scores", inp, "-o", str(tmp_path / "o.jsonl"), "-m", "ps", "--assign", "nope"])
    assert r.exit_code == 2 and "config error: assign='nope'" in r.output
    r = runner.invoke(
        app, ["process-scores", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl"), "-m", "ps"]
    )
    assert r.exit_code == 2 and "missing.jsonl" in r.output


def test_eval_cli_two_models_one_table(tmp_path, shared_data, stub_factory):
    out = tmp_path / "ev"
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            "/ck/a",
            "--model",
            "/ck/b",
            "--name",
            "base",
            "--name",
            "dqo",
            "-o",
            str(out),
            "--dataset",
            "gsm8k",
            "--dataset",
            "math500",
            "--limit",
            "3",
            "--data-dir",
            str(shared_data),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "| model | GSM8K greedy | GSM8K sample | MATH500 greedy | MATH500 sample |" in r.output
    assert [m for _, m, _ in stub_factory] == ["/ck/a", "/ck/b"] and all(s.closed for *_, s in stub_factory)
    for f in ("results.json", "results.md", "accuracy.png", "outputs/dqo/math500.sample.jsonl"):
        assert (out / f).is_file(), f
    doc = json.loads((out / "results.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["base", "dqo"]
    r = runner.invoke(app, ["eval", "--model", "/ck/a", "--name", "x", "--name", "y", "-o", str(out)])
    assert r.exit_code == 2 and "names: 2 names for 1 models" in r.output
