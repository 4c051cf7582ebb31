"""Record validation: each bad input gives its documented RecordError (file, line, field, reason)."""

from __future__ import annotations

import json

import pytest

from dqo_megatron.data.records import (
    RecordError,
    SkipCounter,
    iter_raw,
    parse_record,
    prompt_hash,
    read_records,
    record_to_dict,
    write_jsonl,
)

GOOD = {"prompt": "What is 1+1?", "response": "2\n#### 2", "reward": 1.0}


def _err(raw, **kw) -> RecordError:
    with pytest.raises(RecordError) as info:
        parse_record(raw if isinstance(raw, str) else json.dumps(raw), file="f.jsonl", line=7, **kw)
    assert str(info.value).startswith("f.jsonl:7")
    return info.value


def test_good_record_defaults():
    r = parse_record(json.dumps({**GOOD, "extra_col": [1]}), "f.jsonl", 1)
    assert r.reward == 1.0 and r.prompt_id == prompt_hash("What is 1+1?") and r.extra == {"extra_col": [1]}
    assert parse_record({**GOOD, "reward": None, "correct": False}).reward == 0.0
    assert parse_record({**GOOD, "prompt_id": 12}).prompt_id == "12"
    back = record_to_dict(
        parse_record({**GOOD, "process_segments": [{"text": "2\n", "reward": 0.5}, {"text": "#### 2", "reward": 0}]})
    )
    assert back["process_rewards"] == [[2, 0.5], [8, 0.0]]


def test_truncated_field_parses_and_round_trips():
    assert parse_record(GOOD).truncated is False and "truncated" not in record_to_dict(parse_record(GOOD))
    assert parse_record({**GOOD, "truncated": None}).truncated is False  # a table column other rows fill
    rec = parse_record(json.dumps({**GOOD, "truncated": True, "behavior_logprobs": [-0.5, -0.25]}))
    assert rec.truncated is True and "truncated" not in rec.extra
    back = record_to_dict(rec)
    assert back["truncated"] is True and parse_record(json.dumps(back)).truncated is True
    assert "truncated" not in record_to_dict(parse_record({**GOOD, "truncated": False}))


def test_malformed_json():
    e = _err('{"prompt": "x", "response": ')
    assert e.reason == "malformed_json" and e.line == 7


def test_not_an_object():
    assert _err("[1, 2]").reason == "not_an_object"


@pytest.mark.parametrize("drop,fld", [("prompt", "prompt"), ("response", "response"), ("reward", "reward")])
def test_missing_fields(drop, fld):
    e = _err({k: v for k, v in GOOD.items() if k != drop})
    assert (e.reason, e.field) == ("missing_field", fld)


def test_reward_not_required_for_labeling():
    assert parse_record({"prompt": "p", "response": "r"}, require_reward=False).reward is None


@pytest.mark.parametrize(
    "patch,fld",
    [
        ({"prompt": 3}, "prompt"),
        ({"response": ["a"]}, "response"),
        ({"reward": "1"}, "reward"),
        ({"reward": True}, "reward"),
        ({"reward": None, "correct": "yes"}, "correct"),
        ({"prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role"),
        ({"prompt": [{"role": "user"}]}, "prompt[0].content"),
        ({"behavior_logprobs": "0.1"}, "behavior_logprobs"),
        ({"behavior_logprobs": [-0.1, "a"]}, "behavior_logprobs[1]"),
        ({"process_rewards": [[1.5, 1.0]]}, "process_rewards[0]"),
        ({"process_rewards": [[1, "a"]]}, "process_rewards[0][1]"),
        ({"metadata": [1]}, "metadata"),
        ({"prompt_id": 1.5}, "prompt_id"),
        ({"truncated": "yes"}, "truncated"),
        ({"truncated": 1}, "truncated"),
    ],
)
def test_wrong_types(patch, fld):
    e = _err({**GOOD, **patch})
    assert (e.reason, e.field) == ("wrong_type", fld), str(e)


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt": "p", "response": "r", "reward": NaN}',
        '{"prompt": "p", "response": "r", "reward": Infinity}',
        '{"prompt": "p", "response": "r", "reward": -Infinity}',
    ],
)
def test_non_finite_reward(raw):
    e = _err(raw)
    assert (e.reason, e.field) == ("non_finite", "reward")


def test_non_finite_logprob_and_process_reward():
    assert (
        _err('{"prompt": "p", "response": "r", "reward": 1, "behavior_logprobs": [NaN]}').field
        == "behavior_logprobs[0]"
    )
    assert (
        _err('{"prompt": "p", "response": "r", "reward": 1, "process_rewards": [[1, Infinity]]}').reason == "non_finite"
    )


def test_positive_logprob():
    assert _err({**GOOD, "behavior_logprobs": [-1.0, 0.5]}).reason == "bad_behavior_logprobs"


def test_empty_response_and_prompt():
    assert (_err({**GOOD, "response": ""}).reason) == "empty_response"
    assert _err({**GOOD, "prompt": ""}).reason == "empty_prompt"
    parse_record({**GOOD, "response": " \n"})  # whitespace is a (valid) response


@pytest.mark.parametrize("pr", [[[0, 1.0]], [[3, 1.0], [3, 1.0]], [[99, 1.0]], [[2, 1.0], [1, 1.0]]])
def test_bad_process_offsets(pr):
    assert _err({**GOOD, "process_rewards": pr}).reason == "bad_process_rewards"


def test_bad_segments():
    assert _err({**GOOD, "process_segments": [{"text": "2", "reward": 1}]}).reason == "bad_process_rewards"
    both = {**GOOD, "process_rewards": [[1, 1.0]], "process_segments": [{"text": GOOD["response"], "reward": 1}]}
    assert _err(both).reason == "bad_process_rewards"


def test_read_records_raises_or_counts(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(
        json.dumps(GOOD) + "\n\n{broken\n" + json.dumps({**GOOD, "reward": "x"}) + "\n" + json.dumps(GOOD) + "\n"
    )
    with pytest.raises(RecordError, match=r"r.jsonl:3"):
        list(read_records(str(p)))
    skips = SkipCounter()
    got = list(read_records(str(p), skip_invalid=True, skips=skips))
    assert [r.line for r in got] == [1, 5]  # blank line 2 is no record; lines stay true
    assert dict(skips.counts) == {"malformed_json": 1, "wrong_type": 1}
    assert "malformed_json: 1" in skips.report() and "r.jsonl:3" in skips.report()
    with pytest.raises(ValueError, match="SkipCounter"):
        list(read_records(str(p), skip_invalid=True))


def test_invalid_utf8_line(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    skips = SkipCounter()
    assert len(list(read_records(str(p), skip_invalid=True, skips=skips))) == 1
    assert skips.counts == {"malformed_json": 1}


def test_parquet_and_datasets_dir(tmp_path):
    import datasets

    rows = [GOOD, {**GOOD, "response": "3", "reward": 0.0, "prompt_id": "q"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "r.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "r.parquet", tmp_path / "ds"):
        got = list(read_records(str(path)))
        assert [(r.response, r.reward, r.line) for r in got] == [("2\n#### 2", 1.0, 1), ("3", 0.0, 2)]
    with pytest.raises(ValueError, match="unknown input format"):
        list(iter_raw(str(tmp_path / "x.csv")))


def test_missing_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_records(str(tmp_path / "nope*.jsonl")))


def test_write_jsonl_roundtrip(tmp_path):
    n = write_jsonl([GOOD, {**GOOD, "response": "日本 😀"}], tmp_path / "o.jsonl")
    assert n == 2 and [r.response for r in read_records(str(tmp_path / "o.jsonl"))][1] == "日本 😀"
    with pytest.raises(ValueError):
        write_jsonl([{"reward": float("nan")}], tmp_path / "bad.jsonl")
