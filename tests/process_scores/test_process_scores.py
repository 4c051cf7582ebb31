"""process-scores with a stub generator whose completions are known: exact step rewards, cache, seeds, errors."""

from __future__ import annotations

import json

import pytest

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.records import RecordError, parse_record
from dqo_megatron.process_scores import ProcessScoresConfig, assign_process_rewards, prefix_seed, process_scores
from tests.eval.stubs import StubBackend

PROMPT = "Tom has 8 apples. He eats half, then buys 6. How many does he have?"
FAILED = "Half of 8 is 4.\nThen 4 + 6 = 10.\nTimes 2 is 20.\n#### 20"
ENDS = [16, 33, 48, 55]  # hand-counted: 16 + 17 + 15 + 7 characters
GOOD = "Half of 8 is 4.\nThen 4 + 6 = 10.\n#### 10"


def stub_for(correct_per_prefix: dict[int, int]) -> StubBackend:
    """Completions of the prefix holding k steps: the first correct_per_prefix[k] are right (#### 10)."""

    def fn(prompt, prefix, seed, j, params):
        k = prefix.count("\n")
        return " #### 10" if j < correct_per_prefix[k] else " #### 20"

    return StubBackend(fn)


def write_records(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(n_failed=1):
    base = {"prompt": PROMPT, "task": "gsm8k", "reference_answer": "#### 10"}
    out = [dict(base, response=GOOD, reward=1.0, correct=True, prompt_id="p0")]
    out += [dict(base, response=FAILED, reward=0.0, correct=False, prompt_id="p0", id=f"f{i}") for i in range(n_failed)]
    return out


def run(tmp_path, counts, **kw):
    inp = write_records(tmp_path / "in.jsonl", rows(kw.pop("n_failed", 1)))
    stub = kw.pop("stub", None) or stub_for(counts)
    kw.setdefault("overwrite", True)  # several tests rerun into one output; refusal: tests/reliability
    cfg = ProcessScoresConfig(
        inputs=[inp], output=str(tmp_path / "out.jsonl"), model_id="stub-model", progress=False, **kw
    )
    summary = process_scores(cfg, stub)
    out = [json.loads(line) for line in open(cfg.output)]
    return summary, stub, out


@pytest.mark.parametrize(
    "counts,assign,expected",
    [
        ({1: 5, 2: 2, 3: 0}, "last_correct", [(33, 0.5)]),
        ({1: 5, 2: 2, 3: 0}, "every_correct", [(16, 0.5), (33, 0.5)]),
        ({1: 5, 2: 2, 3: 0}, "value", [(16, 0.5 * (5 / 20 - 2 / 20)), (33, 0.5 * 2 / 20)]),
        # prefix 1 missed by the sampler but prefix 2 solvable: prefix 1 is solvable too
        ({1: 0, 2: 3, 3: 0}, "last_correct", [(33, 0.5)]),
        ({1: 0, 2: 3, 3: 0}, "every_correct", [(16, 0.5), (33, 0.5)]),
        ({1: 0, 2: 3, 3: 0}, "value", [(16, -0.5 * 3 / 20), (33, 0.5 * 3 / 20)]),
        ({1: 0, 2: 0, 3: 0}, "last_correct", []),
        ({1: 20, 2: 20, 3: 1}, "last_correct", [(48, 0.5)]),
    ],
)
def test_exact_step_rewards_end_to_end(tmp_path, counts, assign, expected):
    summary, stub, out = run(tmp_path, counts, assign=assign, step_reward=0.5)
    assert len(out) == 2 and out[0]["response"] == GOOD and "process_rewards" not in out[0]
    rec = out[1]
    got = [(e, r) for e, r in rec.get("process_rewards", [])]
    assert [e for e, _ in got] == [e for e, _ in expected]
    assert [r for _, r in got] == pytest.approx([r for _, r in expected], abs=1e-12)
    assert rec["process_scores"]["step_ends"] == ENDS
    assert rec["process_scores"]["prefix_correct"] == [counts[1], counts[2], counts[3]]
    assert rec["reward"] == 0.0 and rec["correct"] is False  # the outcome reward is kept (combination: add)
    parsed = parse_record(rec)
    assert parsed.process_rewards == [(e, pytest.approx(r)) for e, r in expected]
    # cost: 3 prefixes x M = 20, one generate call (batch across prefixes), prefixes passed to the backend
    assert (summary.prefixes, summary.unique_prefixes, summary.completions_generated) == (3, 3, 60)
    assert len(stub.calls) == 1 and stub.calls[0]["prefixes"] == [FAILED[:16], FAILED[:33], FAILED[:48]]
    p = stub.calls[0]["params"]
    assert (p.n, p.temperature, p.top_p, p.top_k) == (20, 1.0, 0.9, 16)


def test_pure_assignment_and_validation():
    assert assign_process_rewards([5, 9], [1], 4, "last_correct", 0.25) == [(5, 0.25)]
    assert assign_process_rewards([9], [], 4) == []  # one step: nothing to score
    assert assign_process_rewards([3, 6, 9], [2, 4], 4, "value", 1.0) == [(3, -0.5), (6, 1.0)]
    with pytest.raises(ValueError, match="3 steps need 2 prefix counts"):
        assign_process_rewards([3, 6, 9], [1], 4)


def test_success_passes_through_byte_for_byte(tmp_path):
    _, _, _ = run(tmp_path, {1: 1, 2: 0, 3: 0})
    assert open(tmp_path / "out.jsonl").readline() == open(tmp_path / "in.jsonl").readline()


def test_cache_rerun_and_truncated_cache(tmp_path):
    counts = {1: 5, 2: 2, 3: 0}
    _, stub1, out1 = run(tmp_path, counts)
    cache = tmp_path / "out.jsonl.cache.jsonl"
    assert len(cache.read_text().splitlines()) == 3
    summary2, stub2, out2 = run(tmp_path, counts)
    assert stub2.generated == 0 and summary2.cached_prefixes == 3 and out2 == out1
    # a kill in the middle of the last cache line: only that prefix is generated again, same result
    text = cache.read_text()
    cache.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    summary3, stub3, out3 = run(tmp_path, counts)
    assert stub3.generated == 20 and summary3.cached_prefixes == 2 and out3 == out1
    assert stub3.calls[0]["seeds"][0] == stub1.calls[0]["seeds"][2]  # the same seed as the first run's
    # the next run reads the repaired file
    assert run(tmp_path, counts)[1].generated == 0


def test_seeds_do_not_depend_on_batching_and_duplicates_generate_once(tmp_path):
    counts = {1: 5, 2: 2, 3: 0}
    summary, stub, out = run(tmp_path, counts, n_failed=3, prefixes_per_call=2, cache="")
    assert summary.prefixes == 9 and summary.unique_prefixes == 3 and stub.generated == 60
    assert [len(c["prompts"]) for c in stub.calls] == [2, 1]
    seeds = [s for c in stub.calls for s in c["seeds"]]
    assert seeds == [prefix_seed(1234, PROMPT, FAILED[:e]) for e in ENDS[:-1]]
    assert all(r["process_rewards"] == [[16, 0.1], [33, 0.1]] for r in out[1:])  # defaults: every_correct, 0.1
    assert not (tmp_path / "out.jsonl.cache.jsonl").exists()
    _, stub_b, _ = run(tmp_path, counts, prefixes_per_call=1, cache="")
    assert [c["seeds"][0] for c in stub_b.calls] == seeds
    _, stub_c, _ = run(tmp_path, counts, seed=7, cache="")
    assert stub_c.calls[0]["seeds"] != seeds


def test_dry_run_states_cost_and_writes_nothing(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="dqo_megatron.process_scores.scores"):
        summary, stub = None, stub_for({1: 0, 2: 0, 3: 0})
        inp = write_records(tmp_path / "in.jsonl", rows(2))
        summary = process_scores(
            ProcessScoresConfig(
                inputs=[inp], output=str(tmp_path / "o.jsonl"), dry_run=True, num_completions=8, progress=False
            ),
            stub,
        )
    assert stub.calls == [] and not (tmp_path / "o.jsonl").exists()
    assert (summary.records, summary.failed, summary.prefixes, summary.unique_prefixes) == (3, 2, 6, 3)
    assert "3 distinct, 0 cached) x M=8: 24 completions to generate" in caplog.text


def test_splitter_options_reach_the_split(tmp_path):
    summary, stub, out = run(tmp_path, {1: 1, 2: 1, 3: 1}, splitter="regex", split_pattern=r"\.\n", cache="")
    # "." + newline ends a step: the same 4 steps here
    assert out[1]["process_scores"]["step_ends"] == ENDS
    summary, stub, out = run(tmp_path, {1: 1, 2: 1, 3: 1}, max_steps=2, cache="")
    assert out[1]["process_scores"]["step_ends"] == [33, 55] and summary.prefixes == 1


def test_record_errors_name_file_line_and_field(tmp_path):
    bad = rows()
    del bad[1]["reference_answer"]
    inp = write_records(tmp_path / "in.jsonl", bad)
    cfg = ProcessScoresConfig(inputs=[inp], output=str(tmp_path / "o.jsonl"), progress=False)
    with pytest.raises(RecordError, match=r"in.jsonl:2: field 'reference_answer'"):
        process_scores(cfg, stub_for({}))
    pre = rows()
    pre[1]["process_rewards"] = [[16, 1.0]]
    inp = write_records(tmp_path / "in2.jsonl", pre)
    with pytest.raises(RecordError, match=r"in2.jsonl:2: field 'process_rewards'.*--replace-rewards"):
        process_scores(
            ProcessScoresConfig(inputs=[inp], output=str(tmp_path / "o.jsonl"), progress=False), stub_for({})
        )
    summary = process_scores(
        ProcessScoresConfig(
            inputs=[inp], output=str(tmp_path / "o.jsonl"), replace_rewards=True, cache="", progress=False
        ),
        stub_for({1: 0, 2: 1, 3: 0}),
    )
    assert json.loads(open(tmp_path / "o.jsonl").readlines()[1])["process_rewards"] == [[16, 0.1], [33, 0.1]]
    # skip-invalid: counted, not written
    inp = write_records(tmp_path / "in3.jsonl", rows() + [{"prompt": "x", "response": "", "reward": 0}])
    summary = process_scores(
        ProcessScoresConfig(
            inputs=[inp], output=str(tmp_path / "o3.jsonl"), skip_invalid=True, cache="", progress=False
        ),
        stub_for({1: 0, 2: 0, 3: 0}),
    )
    assert summary.skips.counts == {"empty_response": 1}
    assert len(open(tmp_path / "o3.jsonl").readlines()) == 2


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"num_completions": 0}, "num_completions"),
        ({"splitter": "words"}, "splitter"),
        ({"splitter": "regex"}, "split_pattern"),
        ({"splitter": "regex", "split_pattern": "("}, "split_pattern"),
        ({"assign": "first"}, "assign"),
        ({"step_reward": 0}, "step_reward"),
        ({"max_steps": 1}, "max_steps"),
        ({"top_p": 0}, "sampling"),
        ({"temperature": 0}, "num_completions=1"),
        ({"prefixes_per_call": 0}, "prefixes_per_call"),
        ({"output": ""}, "output"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    args = {"inputs": ["x.jsonl"], "output": "o.jsonl"} | kw
    with pytest.raises(ConfigError, match=field):
        ProcessScoresConfig(**args)


def test_each_distinct_answer_is_checked_once(tmp_path, monkeypatch):
    import dqo_megatron.process_scores.scores as ps

    calls = []
    real = ps.check_answer
    monkeypatch.setattr(ps, "check_answer", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    summary, _, out = run(tmp_path, {1: 5, 2: 2, 3: 0}, n_failed=2, cache="")
    # 3 prefixes x 20 completions, answers "10" or "20" against one reference: two comparisons
    assert summary.answer_checks == 2 and len(calls) == 2
    assert out[1]["process_scores"]["prefix_correct"] == [5, 2, 0]
    memo = ps.AnswerMemo()
    assert memo.correct("math", "so \\boxed{0.5}", "\\frac12") and memo.correct("math", "\\boxed{0.5}!", "\\frac12")
    assert memo.checks == 1 and not memo.correct("math", "no box", "1") and memo.checks == 1


def test_a_preference_pair_row_scores_its_rejected_side_only(tmp_path):
    """A TRL pair row is two records on one line: the failed (rejected) side gets the process rewards, the
    chosen side none, and the output holds both as native records."""
    pair = {"prompt": PROMPT, "chosen": GOOD, "rejected": FAILED, "task": "gsm8k", "reference_answer": "#### 10"}
    inp = write_records(tmp_path / "pairs.jsonl", [pair])
    cfg = ProcessScoresConfig(
        inputs=[inp], output=str(tmp_path / "out.jsonl"), model_id="stub-model", progress=False, step_reward=0.5
    )
    process_scores(cfg, stub_for({1: 5, 2: 2, 3: 0}))
    out = [json.loads(line) for line in open(cfg.output)]
    assert [(r["response"], r["correct"]) for r in out] == [(GOOD, True), (FAILED, False)]
    assert "process_rewards" not in out[0] and "process_scores" not in out[0]
    assert out[1]["process_rewards"] == [[16, 0.5], [33, 0.5]]  # every_correct (the default)
    assert out[1]["process_scores"]["step_ends"] == ENDS
