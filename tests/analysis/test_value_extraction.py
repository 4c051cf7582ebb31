"""Steps map to the tokens preprocessing credits; per-step values equal a direct forward of the value network.

The model tests run in one forked gloo process (`tests.helpers.distributed`), as the rest of the suite.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dqo_megatron.analysis.scores import SplitConfig, parse_process_scores, plan_steps, resolve_score_kind, step_scores
from dqo_megatron.analysis.value_analysis import prepare_samples
from dqo_megatron.data.records import RecordError, SkipCounter, parse_record
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, TokenizerConfig, tokenize_records
from tests.analysis.conftest import make_records
from tests.helpers.distributed import run_distributed

MODEL = dict(
    family="llama",
    num_layers=2,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    vocab_size=48,
    seq_length=64,
)


def _records(rows):
    return [parse_record(json.dumps(r), "held_out.jsonl", i + 1, require_reward=False) for i, r in enumerate(rows)]


def test_step_positions_are_where_preprocessing_puts_process_rewards(word_tok_dir):
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    tok = Tokenizer(cfg.tokenizer)
    rows = make_records(10, seed=3)
    for r in rows:  # distinct non-zero rewards so each shows up in preprocessing's reward array
        r["process_rewards"] = [[end, 0.25 * (j + 1)] for j, (end, _) in enumerate(r["process_rewards"])]
    records = _records(rows)
    counts = Counter()
    samples = prepare_samples(records, tok, cfg, "process_reward", SkipCounter(), False, counts)
    tokenized = tokenize_records(tok, records, cfg)
    assert counts["records"] == counts["records_with_steps"] == 10 and counts["terminal_steps"] == 0
    assert counts["steps"] == sum(len(r["process_rewards"]) for r in rows)
    for rec, row, s, t in zip(records, rows, samples, tokenized):
        assert np.array_equal(s.tokens, t.tokens) and s.prompt_length == t.prompt_length
        expected = np.zeros(len(t.tokens), np.float32)
        expected[s.positions] = [v for _, v in row["process_rewards"]]
        expected[-1] += row["reward"]
        np.testing.assert_array_equal(t.rewards, expected)  # the same tokens as preprocessing
        for (end, _), pos in zip(row["process_rewards"], s.positions):
            last_word = row["response"][:end].split()[-1]  # the step's last word ends the step
            assert tok.decode([s.tokens[pos]]) == last_word
        assert s.positions.max() < len(s.tokens) - 1  # never EOS
        np.testing.assert_array_equal(s.scores, [v for _, v in row["process_rewards"]])


def test_reward_scores():
    (rec,) = _records(
        [
            {
                "prompt": "so",
                "response": "step one add 2 = 2",
                "reward": 1.0,
                "process_rewards": [[3, 1.0], [4, 0.5], [9, 0.25]],
            }
        ]
    )
    # steps 0 and 1 end on the same token: neither is "later" than the other
    plan = plan_steps(rec, "process_reward", SplitConfig())
    np.testing.assert_allclose(step_scores(rec, "return_to_go", plan, [2, 2, 5]), [1.25, 1.25, 1.0])
    np.testing.assert_allclose(step_scores(rec, "process_reward", plan, [2, 2, 5]), [1.0, 0.5, 0.25])
    assert plan.ends == [3, 4, 9] and plan.first_unsolvable is None and plan.n_solvable == 0
    # a prefix kind reads a correct answer without process_scores as its split steps, all solvable
    assert plan_steps(rec, "prefix_success", SplitConfig()).ends == [len(rec.response)]
    (no_reward,) = _records([{"prompt": "so", "response": "step one", "process_rewards": [[3, 1.0]]}])
    with pytest.raises(RecordError, match=r"held_out.jsonl:1: field 'reward'.*\[missing_field\]"):
        step_scores(no_reward, "return_to_go", plan_steps(no_reward, "return_to_go", SplitConfig()), [0])


def test_process_scores_field(word_tok_dir):
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    tok = Tokenizer(cfg.tokenizer)
    rows = make_records(6, seed=5, process_scores=True, m=4)
    records = _records(rows)
    assert resolve_score_kind("auto", records) == "prefix_success"
    assert resolve_score_kind("auto", _records(make_records(2))) == "process_reward"
    for kind in ("prefix_success", "prefix_solvable"):
        counts = Counter()
        samples = prepare_samples(records, tok, cfg, kind, SkipCounter(), False, counts)
        assert counts["steps"] == sum(len(r["process_scores"]["step_ends"]) for r in rows)
        for row, s in zip(rows, samples):
            c = row["process_scores"]["prefix_correct"]
            prefix = [x / 4 for x in c] if kind == "prefix_success" else [float(x > 0) for x in c]
            np.testing.assert_allclose(s.scores, prefix + [row["reward"]])
            # the last step ends with the response: V is read at its last text token, before EOS
            assert s.positions[-1] == len(s.tokens) - 2
            for end, pos in zip(row["process_scores"]["step_ends"], s.positions):
                assert tok.decode([s.tokens[pos]]) == row["response"][:end].split()[-1]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"step_ends": [5, 3], "prefix_correct": [1], "num_completions": 4}, "process_scores.step_ends[1]"),
        ({"step_ends": [3, 8], "prefix_correct": [], "num_completions": 4}, "process_scores.prefix_correct"),
        ({"step_ends": [3, 8], "prefix_correct": [5], "num_completions": 4}, "process_scores.prefix_correct[0]"),
        ({"step_ends": [3, 8], "prefix_correct": [1], "num_completions": 0}, "process_scores.num_completions"),
        ({"step_ends": [3, 99], "prefix_correct": [1], "num_completions": 4}, "process_scores.step_ends[1]"),
        ([3, 8], "process_scores"),
    ],
)
def test_bad_process_scores_name_file_line_and_field(bad, field, word_tok_dir):
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    good = {
        "prompt": "so",
        "response": "step one",
        "reward": 0.0,
        "process_scores": {"step_ends": [4, 8], "prefix_correct": [2], "num_completions": 4},
    }
    records = _records([good, {**good, "process_scores": bad}])
    with pytest.raises(RecordError, match=rf"held_out.jsonl:2: field '{re.escape(field)}'.*\[bad_process_scores\]"):
        parse_process_scores(records[1])
    with pytest.raises(RecordError, match="held_out.jsonl:2"):
        prepare_samples(records, Tokenizer(cfg.tokenizer), cfg, "prefix_success", SkipCounter(), False, Counter())
    skips, counts = SkipCounter(), Counter()
    samples = prepare_samples(records, Tokenizer(cfg.tokenizer), cfg, "prefix_success", skips, True, counts)
    assert len(samples) == 1 and skips.counts == {"bad_process_scores": 1} and counts["steps"] == 2


def test_records_without_steps_and_terminal_steps(word_tok_dir):
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(path=word_tok_dir, use_chat_template=False))
    tok = Tokenizer(cfg.tokenizer)
    rows = [
        {"prompt": "so", "response": "   ", "reward": 0.0, "process_rewards": [[2, 1.0]]},  # no text token
        {"prompt": "so", "response": "the answer is 4", "reward": 1.0},
    ]
    counts = Counter()
    samples = prepare_samples(_records(rows), tok, cfg, "process_reward", SkipCounter(), False, counts)
    assert counts["records"] == 2 and counts["steps"] == 0 and counts["terminal_steps"] == 1
    assert [s.positions.size for s in samples] == [0, 0]


# ---------------------------------------------------------------------------------------- the model
def _model_body(tmp: str, tok_dir: str, records_file: str) -> dict:
    from dqo_megatron import parallel
    from dqo_megatron.analysis import ValueAnalysisConfig, run_value_analysis
    from dqo_megatron.analysis.value_model import ValueModel, load_value_model, resolve_checkpoints, sequence_values
    from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig
    from dqo_megatron.conversion.megatron_io import CheckpointInfo, save_chunks, write_metadata
    from dqo_megatron.conversion.value import value_from_megatron
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.models.value_head import FinalHiddenStates, ValueHead

    parallel.initialize(ParallelConfig(), seed=7)
    model = ModelConfig(**MODEL)
    (gpt,) = build_model_chunks(model, ParallelConfig())
    head = ValueHead(model.hidden_size, init_std=0.5)
    with torch.no_grad():
        head.bias.fill_(0.3)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.vocab_size, (n,), generator=gen).numpy() for n in (5, 17, 9, 17, 3, 12, 30)]
    batched = sequence_values(ValueModel(gpt, head), seqs, batch_size=3)  # padded batches, sorted by length

    gpt.eval()
    direct = []  # one sequence at a time, no padding, hidden states captured by a hook while logits are computed
    with torch.no_grad(), FinalHiddenStates(gpt) as captured:
        for s in seqs:
            ids = torch.as_tensor(s)[None]
            gpt(ids, torch.arange(len(s))[None], None)
            h = captured.hidden[:, 0, :].double()  # [s, h]
            direct.append((h @ head.weight.double()[0] + head.bias.double()).numpy())

    # bias-only head: V is the bias everywhere
    zero = ValueHead(model.hidden_size)
    with torch.no_grad():
        zero.bias.fill_(0.7)
    constant = sequence_values(ValueModel(gpt, zero), seqs, batch_size=4)

    # the same network as a value conversion checkpoint: loads back into the same values
    gpt.value_head = head
    save_chunks([gpt], Path(tmp) / "value" / "weights")
    write_metadata(Path(tmp) / "value", model, CheckpointInfo(family="llama", dtype="float32", kind="value"))
    del gpt._modules["value_head"]
    (ckpt,) = resolve_checkpoints([Path(tmp) / "value"])
    reloaded = sequence_values(load_value_model(ckpt), seqs, batch_size=2)

    # `convert --value` of a policy checkpoint: zero head, V = 0 everywhere -> correlations undefined
    save_chunks([gpt], Path(tmp) / "policy" / "weights")
    write_metadata(Path(tmp) / "policy", model, CheckpointInfo(family="llama", dtype="float32"))
    value_from_megatron(Path(tmp) / "policy", Path(tmp) / "fresh-value")
    errors = {}
    try:
        resolve_checkpoints([Path(tmp) / "policy"])
    except ConfigError as exc:
        errors["policy"] = str(exc)
    cfg = ValueAnalysisConfig(
        checkpoints=[str(Path(tmp) / "fresh-value")],
        records=[records_file],
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok_dir, use_chat_template=False)),
        out_dir=f"{tmp}/fresh",
        plot=False,
    )
    (fresh,) = run_value_analysis(cfg)
    return {
        "batched": batched,
        "direct": direct,
        "constant": constant,
        "reloaded": reloaded,
        "kind": ckpt.kind,
        "mode": ckpt.value_mode,
        "fresh": fresh,
        "errors": errors,
    }


def test_values_equal_a_direct_forward(tmp_path, word_tok_dir, records_file):
    (res,) = run_distributed(_model_body, 1, str(tmp_path), word_tok_dir, records_file)
    assert res["kind"] == "value_conversion" and res["mode"] == "value_checkpoint"
    for b, d, c, r in zip(res["batched"], res["direct"], res["constant"], res["reloaded"]):
        assert b.shape == d.shape
        np.testing.assert_allclose(b, d, rtol=1e-5, atol=1e-5)
        assert np.ptp(b) > 1e-3  # a real function of the tokens, not a constant
        np.testing.assert_allclose(c, 0.7, rtol=0, atol=1e-6)
        np.testing.assert_allclose(r, b, rtol=0, atol=1e-6)
    fresh = res["fresh"]  # a value checkpoint fresh from `convert --value`: zero head
    assert fresh["kind"] == "value_conversion" and fresh["label"] == "fresh-value" and fresh["step"] is None
    assert fresh["pearson"] is None and fresh["spearman"] is None and "values constant" in fresh["undefined_reason"]
    assert fresh["value_stats"] == {"mean": 0.0, "std": 0.0} and fresh["n"] > 0 and fresh["plot"] is None
    assert "policy conversion checkpoint: it has no value head" in res["errors"]["policy"]


def test_checkpoint_errors(tmp_path):
    from dqo_megatron.analysis.value_model import resolve_checkpoints
    from dqo_megatron.config import ConfigError, RunConfig, save_config

    with pytest.raises(FileNotFoundError, match="nowhere"):
        resolve_checkpoints([tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="neither a complete training checkpoint"):
        resolve_checkpoints([tmp_path])
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "COMPLETE").write_text("{}")
    with pytest.raises(ConfigError, match="config.yaml does not exist"):
        resolve_checkpoints([step])
    save_config(RunConfig(algorithm="sft"), tmp_path / "run")
    with pytest.raises(ConfigError, match="algorithm='sft', which learns no value network"):
        resolve_checkpoints([tmp_path / "run"])
    save_config(RunConfig(), tmp_path / "run")
    (ckpt,) = resolve_checkpoints([tmp_path / "run"])
    assert (ckpt.kind, ckpt.step, ckpt.label, ckpt.value_mode) == ("training", 3, "run-step_00000003", "separate")
