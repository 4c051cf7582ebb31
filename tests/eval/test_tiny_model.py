"""End to end with a real (tiny) model: the trained stories260K Llama through the rollout factory's
transformers backend, on CPU. process-scores writes valid records with the step rewards the answer
format forces; eval runs from the command line and writes the table, JSON, PNG and per-problem outputs."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dqo_megatron.cli import app
from dqo_megatron.data.records import SkipCounter, read_records

runner = CliRunner()

# A GSM8K-format failed response whose prefixes are solvable by construction: the checker takes the answer
# after the LAST "####", and the stories model never writes "#" (a 512-piece TinyStories vocabulary), so a
# completion of a prefix that already holds "#### 5" is graded 5 (correct) and one of a prefix without it
# has no answer (wrong). Steps (lines): "Lily went to the park.\n" | "#### 5\n" | "She was happy.\n" | "#### 7".
FAILED = "Lily went to the park.\n#### 5\nShe was happy.\n#### 7"
ENDS = [23, 30, 45, 51]


@pytest.fixture(scope="module")
def tiny_model(shared_data, tmp_path_factory):
    """(HF directory of stories260K, its sentencepiece model)."""
    from tests.conversion.llama2c import llama2c_to_hf

    src = shared_data / "models" / "stories260K"
    out = llama2c_to_hf(
        src / "stories260K.bin", tmp_path_factory.mktemp("stories") / "stories260K-hf", src / "tok512.model"
    )
    return str(out), str(src / "tok512.model")


def _records(path):
    base = {"prompt": "Once upon a time", "task": "gsm8k", "reference_answer": "#### 5"}
    rows = [
        dict(base, response="Lily was happy.\n#### 5", reward=1.0, correct=True),
        dict(base, response=FAILED, reward=0.0, correct=False, id="failed-1"),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _process_scores(tmp_path, tiny_model, out_name, *extra):
    model, tok = tiny_model
    inp = _records(tmp_path / "labeled.jsonl")
    out = tmp_path / out_name
    r = runner.invoke(
        app,
        [
            "process-scores",
            inp,
            "-o",
            str(out),
            "-m",
            model,
            "-t",
            tok,
            "--backend",
            "transformers",
            "--device",
            "cpu",
            "-M",
            "4",
            "--max-new-tokens",
            "12",
            "--no-progress",
            *extra,
        ],
    )
    assert r.exit_code == 0, r.output
    return r.output, out


def test_process_scores_with_a_real_model(tmp_path, tiny_model):
    output, out = _process_scores(tmp_path, tiny_model, "scored.jsonl")
    assert "completions generated 12" in output  # 3 prefixes x M = 4
    skips = SkipCounter()
    recs = list(read_records(str(out), skip_invalid=True, skips=skips))
    assert skips.total == 0 and len(recs) == 2
    assert recs[0].process_rewards == [] and recs[0].reward == 1.0
    failed = recs[1]
    assert failed.extra["process_scores"]["step_ends"] == ENDS
    assert failed.extra["process_scores"]["prefix_correct"] == [0, 4, 4]
    # every_correct (the default, r = 0.1): each step of the longest solvable prefix (steps 1-3)
    assert failed.process_rewards == [(e, 0.1) for e in ENDS[:3]] and failed.reward == 0.0
    # a rerun reads every completion from the cache (and must say --overwrite to replace its output)
    first = out.read_text()
    refused = runner.invoke(
        app, ["process-scores", str(tmp_path / "labeled.jsonl"), "-o", str(out), "-m", tiny_model[0], "--no-progress"]
    )
    assert refused.exit_code == 2 and "already exists" in refused.output and out.read_text() == first
    output2, out2 = _process_scores(tmp_path, tiny_model, "scored.jsonl", "--overwrite")
    assert "completions generated 0" in output2 and out2.read_text() == first
    cache = {c["key"]: c["texts"] for c in map(json.loads, open(str(out) + ".cache.jsonl"))}
    assert len(cache) == 3 and all(len(t) == 4 for t in cache.values())
    assert len(set(map(tuple, cache.values()))) == 3  # different prefixes, different samples
    # the same seeds in a fresh cache give the same completions; another assignment of the same counts
    other = tmp_path / "other.cache.jsonl"
    _, out3 = _process_scores(tmp_path, tiny_model, "value.jsonl", "--cache", str(other), "--assign", "value")
    assert {c["key"]: c["texts"] for c in map(json.loads, open(other))} == cache
    value = [json.loads(line) for line in open(out3)][1]
    assert value["process_rewards"] == [[23, -0.1], [45, 0.1]]  # v = (0, 1, 1, 0): r * (v_k - v_k+1), r = 0.1
    # preprocessing puts the step reward on the token holding the step's last character, the outcome on EOS
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

    prefix = str(tmp_path / "ds")
    preprocess(
        PreprocessConfig(
            inputs=[str(out)],
            output_prefix=prefix,
            progress=False,
            tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tiny_model[1])),
        )
    )
    doc = TrajectoryDataset(prefix)[1]
    nonzero = [(i, float(r)) for i, r in enumerate(doc["rewards"]) if r != 0]
    assert [r for _, r in nonzero] == pytest.approx([0.1] * 3) and doc["outcome_reward"] == 0.0
    import sentencepiece as spm

    # every_correct: one reward on each of steps 1-3, at the token holding the step's last character
    pieces = spm.SentencePieceProcessor(model_file=tiny_model[1]).encode(FAILED, return_type="proto").pieces
    for (position, _), end in zip(nonzero, ENDS[:3]):
        last = max(
            i for i, p in enumerate(pieces) if len(FAILED.encode()[: p.begin].decode()) < end
        )  # holds char end-1
        assert position == doc["prompt_length"] + last


def test_eval_cli_with_a_real_model(tmp_path, tiny_model, shared_data):
    model, tok = tiny_model
    out = tmp_path / "eval"
    args = [
        "eval",
        "--model",
        model,
        "--name",
        "stories",
        "-t",
        tok,
        "--backend",
        "transformers",
        "--device",
        "cpu",
        "--dataset",
        "gsm8k",
        "--dataset",
        "math500",
        "--limit",
        "3",
        "--max-new-tokens",
        "12",
        "--num-samples",
        "2",
        "--data-dir",
        str(shared_data),
        "-o",
        str(out),
        "--no-progress",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "| stories | 0.00 | 0.00 | 0.00 | 0.00 |" in r.output  # a story model solves nothing
    doc = json.loads((out / "results.json").read_text())
    assert doc["results"]["stories"]["math500"]["sample"]["n"] == 3
    assert doc["generation"]["stories"]["greedy"]["generated"] == 6  # 3 GSM8K + 3 MATH500 prompts
    assert doc["generation"]["stories"]["sample"]["generated"] == 12
    rows = [json.loads(line) for line in open(out / "outputs" / "stories" / "gsm8k.sample.jsonl")]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 and r["reasons"] == ["no_answer"] * 2 for r in rows)
    assert rows[0]["finish_reasons"] == ["length", "length"]
    assert (out / "accuracy.png").stat().st_size > 1000 and "## MATH500 by level" in (out / "results.md").read_text()
    # greedy is deterministic and the second run is served from the cache
    greedy = (out / "outputs" / "stories" / "gsm8k.greedy.jsonl").read_text()
    r = runner.invoke(app, args)
    assert (
        r.exit_code == 0
        and json.loads((out / "results.json").read_text())["generation"]["stories"]["greedy"]["generated"] == 0
    )
    assert (out / "outputs" / "stories" / "gsm8k.greedy.jsonl").read_text() == greedy
