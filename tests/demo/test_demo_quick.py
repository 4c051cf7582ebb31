"""`dqo-megatron demo --quick`: every stage runs through the real commands and leaves valid outputs (~1.5 min)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dqo_megatron.data.records import read_records


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run([sys.executable, "-m", "dqo_megatron", "demo", "--quick", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, done


def test_every_stage_reports_and_finishes(quick_demo):
    run_dir, done = quick_demo
    results = json.loads((run_dir / "demo.json").read_text())
    names = [s["name"] for s in results["stages"]]
    assert names == ["task", "tokenizer", "warm-up", "rollout", "process scores", "data", "DQO", "DRO", "eval",
                     "value analysis", "report"]  # fmt: skip
    for k, name in enumerate(names, 1):  # one progress line per stage, with its duration
        assert f"[{k}/{len(names)}] {name}: " in done.stderr
    assert all(s["seconds"] > 0 for s in results["stages"])
    assert "| base |" in done.stdout and "| DQO |" in done.stdout and "| DRO |" in done.stdout


def test_stage_outputs_are_valid(quick_demo):
    run_dir, _ = quick_demo
    # rollouts: valid records, labeled, with behavior log-probs for the finished samples
    rollouts = list(read_records([str(run_dir / "rollouts.jsonl")]))
    assert len(rollouts) == 64 * 4 and {r.reward for r in rollouts} <= {0.0, 1.0}
    assert sum(r.behavior_logprobs is not None for r in rollouts) > len(rollouts) // 2
    # process scores: valid records, some failed answers got step rewards
    scored = list(read_records([str(run_dir / "analysis_scored.jsonl")]))
    assert any(r.process_rewards for r in scored)
    # the indexed dataset with its reference log-probs filled by annotate
    from dqo_megatron.data.dataset import TrajectoryDataset

    data = TrajectoryDataset(str(run_dir / "data" / "rollouts"))
    assert len(data) == len(rollouts) and data.manifest["ref_logprobs_filled"]
    assert (data[0]["ref_logprobs"][data.prompt_lengths[0]:] < 0).any()
    # converted base model, trained checkpoints and HF exports
    assert (run_dir / "base" / "model_config.yaml").is_file()
    for algo in ("sft", "dqo", "dro"):
        assert list((run_dir / "runs" / algo / "checkpoints").glob("step_*/COMPLETE"))
    for name in ("base", "dqo", "dro"):
        assert (run_dir / "hf" / name / "model.safetensors").is_file()
    # eval table, value analysis plots, curves, report
    table = (run_dir / "eval" / "results.md").read_text()
    assert "base" in table and "DQO" in table and "DRO" in table
    assert len(list((run_dir / "value_analysis").glob("*.png"))) == 2
    for png in ("training_curves.png", "eval/accuracy.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DQO reached" in (run_dir / "report.md").read_text()


def test_training_reduced_the_loss(quick_demo):
    run_dir, _ = quick_demo
    results = json.loads((run_dir / "demo.json").read_text())
    first, last = results["measured"]["sft_loss"]
    assert last < 0.5 * first
    for algo in ("dqo", "dro"):
        rows = [json.loads(line) for line in (run_dir / "runs" / algo / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 12 and all(r["applied"] for r in rows)
