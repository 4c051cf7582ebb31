"""`dqo-megatron demo --quick`: every stage runs through the real commands and leaves valid outputs (~1.5 min)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dqo_megatron.data.records import read_records


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "demo", "--quick", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return run_dir, done


def test_every_stage_reports_and_finishes(quick_demo):
    run_dir, done = quick_demo
    results = json.loads((run_dir / "demo.json").read_text())
    names = [s["name"] for s in results["stages"]]
    assert names == [
        "task",
        "tokenizer",
        "warm-up",
        "rollout",
        "process scores",
        "data",
        "DRO",
        "DQO",
        "DQO+PS",
        "eval",
        "value analysis",
        "report",
    ]
    for k, name in enumerate(names, 1):  # one progress line per stage, with its duration
        assert f"[{k}/{len(names)}] {name}: " in done.stderr
    assert all(s["seconds"] > 0 for s in results["stages"])
    for row in ("base", "DRO", "DQO", "DQO+PS"):
        assert f"| {row} |" in done.stdout


def test_stage_outputs_are_valid(quick_demo):
    run_dir, _ = quick_demo
    # rollouts: valid records, labeled, with behavior log-probs for the finished samples
    rollouts = list(read_records([str(run_dir / "rollouts.jsonl")]))
    assert len(rollouts) == 48 * 4 and {r.reward for r in rollouts} <= {0.0, 1.0}
    assert sum(r.behavior_logprobs is not None for r in rollouts) > len(rollouts) // 2
    # process scores of the training answers (DQO+PS) and of held-out answers (value analysis)
    for name in ("rollouts_scored.jsonl", "analysis_scored.jsonl"):
        scored = list(read_records([str(run_dir / name)]))
        assert any(r.process_rewards for r in scored), name
    # the indexed datasets with their reference log-probs filled by annotate; process rewards inside answers
    from dqo_megatron.data.dataset import TrajectoryDataset

    data = TrajectoryDataset(str(run_dir / "data" / "rollouts"))
    assert len(data) == len(rollouts) and data.manifest["ref_logprobs_filled"]
    assert (data[0]["ref_logprobs"][data.prompt_lengths[0] :] < 0).any()
    with_ps = TrajectoryDataset(str(run_dir / "data" / "rollouts_ps"))
    assert with_ps.manifest["ref_logprobs_filled"] and len(with_ps) == len(data)
    inner = [
        d for d in map(with_ps.__getitem__, range(len(with_ps))) if (d["rewards"][d["prompt_length"] : -1] > 0).any()
    ]
    assert inner, "no process reward inside any response"
    # converted base model, trained checkpoints, the validation log that picked them, HF exports
    assert (run_dir / "base" / "model_config.yaml").is_file()
    for algo in ("sft", "dro", "dqo", "dqo_ps"):
        assert list((run_dir / "runs" / algo / "checkpoints").glob("step_*/COMPLETE"))
    from dqo_megatron.training.evals import best_evaluation, read_evaluations

    results = json.loads((run_dir / "demo.json").read_text())
    for algo in ("dro", "dqo", "dqo_ps"):
        evals = read_evaluations(run_dir / "runs" / algo)
        assert [e.step for e in evals] == [6, 12, 18]  # from the end of the 6-step critic warm-up
        picked = results["measured"][f"{algo}_selection"]
        assert picked["picked_step"] == best_evaluation(evals).step
        assert (Path(picked["picked_checkpoint"]) / "COMPLETE").is_file()
    for name in ("base", "dro", "dqo", "dqo_ps"):
        assert (run_dir / "hf" / name / "model.safetensors").is_file()
    # eval table, value analysis (per checkpoint, trends), curves, report
    table = (run_dir / "eval" / "results.md").read_text()
    assert all(name in table for name in ("base", "DRO", "DQO", "DQO+PS"))
    rows = {r["label"]: r for r in results["measured"]["value_analysis"]}
    assert rows["DRO"]["value_target"] == "prompt" and rows["DQO"]["value_target"] == "token"
    assert len(results["measured"]["value_trend"]["DQO"]) == 3  # steps 6, 12, 18
    assert list((run_dir / "value_analysis").glob("trend_*.png"))
    for png in ("training_curves.png", "eval/accuracy.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "DQO (step " in (run_dir / "report.md").read_text() and " reached " in (run_dir / "report.md").read_text()


def test_exports_answer_through_plain_transformers_as_through_eval(quick_demo):
    """hf/<row> alone (model, tokenizer, generation config) is a model `transformers` runs: the sentencepiece
    tokenizer went along as an HF tokenizer with the same ids, so greedy answers to the test problems, framed
    as plain transformers frames them (the tokenizer adds BOS), are the texts `eval` wrote (~10 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = quick_demo
    max_new = json.loads((run_dir / "demo.json").read_text())["measured"]["max_new_tokens"]
    for name, row in (("base", "base"), ("dqo", "DQO")):
        export = run_dir / "hf" / name
        for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
            assert (export / f).is_file(), f
        assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 2
        tok = AutoTokenizer.from_pretrained(str(export), padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
        evaluated = [json.loads(line) for line in (run_dir / "eval" / "outputs" / row / "addition.greedy.jsonl").open()]
        batch = tok([r["prompt"] for r in evaluated], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new, do_sample=False)
        answers = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answers == [r["responses"][0] for r in evaluated], name
        one = tok(evaluated[0]["prompt"], return_tensors="pt")  # unpadded, as a user would call it
        with torch.no_grad():
            out = model.generate(**one, max_new_tokens=max_new, do_sample=False)
        assert tok.decode(out[0, one["input_ids"].shape[1] :], skip_special_tokens=True) == answers[0]


def test_training_reduced_the_loss(quick_demo):
    run_dir, _ = quick_demo
    results = json.loads((run_dir / "demo.json").read_text())
    first, last = results["measured"]["sft_loss"]
    assert last < 0.5 * first
    for algo in ("dro", "dqo", "dqo_ps"):
        rows = [json.loads(line) for line in (run_dir / "runs" / algo / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 6 + 12 and all(r["applied"] for r in rows)  # warm-up + policy steps


@pytest.mark.slow
def test_quick_demo_under_tensor_parallelism_validates_saved_checkpoints(tmp_path):
    """--tp 2: the in-training evaluator needs TP = 1, so the demo validates the saved checkpoints
    afterwards (megatron backend at TP = 1) and picks from them by the same rule (~2.5 min)."""
    from dqo_megatron.training.evals import best_evaluation, read_evaluations

    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "dqo_megatron", "demo", "--quick", "--tp", "2", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((run_dir / "demo.json").read_text())
    for algo in ("dro", "dqo", "dqo_ps"):
        evals = read_evaluations(run_dir / "runs" / algo)
        assert [e.step for e in evals] == [6, 12, 18]
        assert results["measured"][f"{algo}_selection"]["picked_step"] == best_evaluation(evals).step
