"""TRL's dataset shapes preprocess into exactly the tokens of their native equivalents; `datasets` inputs
(a DatasetDict split, a cached hub name) and the offline error; malformed TRL rows name file:line and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.indexed import META_FIELDS, dataset_files
from dqo_megatron.data.pairs import build_dpo_pairs, is_positive
from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
from dqo_megatron.data.records import RecordError, SkipCounter, read_records
from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
from dqo_megatron.tasks.datasets import load_problems
from tests.data.conftest import write_jsonl

SYS = {"role": "system", "content": "Be brief."}


def _user(text):
    return {"role": "user", "content": text}


def _bot(text):
    return {"role": "assistant", "content": text}


def _run(tmp_path, src, name, hf_tok_dir, **kw):
    """Preprocess `src` (a path, or rows written as JSONL) and return the dataset's prefix."""
    if not isinstance(src, str):
        src = write_jsonl(tmp_path / f"{name}.jsonl", src)
    prefix = str(tmp_path / name / "data")
    tok = TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir))
    preprocess(PreprocessConfig(inputs=[src], output_prefix=prefix, progress=False, tokenize=tok, **kw))
    return prefix


def _same_dataset(a: str, b: str, same_lines: bool = True) -> None:
    """Token, reward and reference files byte-identical; meta too (but for the source line, when not
    `same_lines`: a pair row is one line holding two records); the same prompt ids."""
    for fa, fb in zip(dataset_files(a), dataset_files(b)):
        assert os.path.exists(fa) == os.path.exists(fb), os.path.basename(fa)
        if fa.endswith(".json") or "_meta" in fa or not os.path.exists(fa):
            continue
        assert Path(fa).read_bytes() == Path(fb).read_bytes(), os.path.basename(fa)
    da, db = TrajectoryDataset(a), TrajectoryDataset(b)
    keep = [i for i, f in enumerate(META_FIELDS) if same_lines or f != "line"]
    np.testing.assert_array_equal(da.meta[:, keep], db.meta[:, keep])
    assert da.prompt_ids == db.prompt_ids and len(da) > 0


# (TRL rows, the native rows they stand for, whether a TRL row is one record per line)
FORMATS = {
    "prompt_completion_label": (
        [
            {"prompt": "What is 2+2?", "completion": "4\n#### 4", "label": True},
            {"prompt": "What is 2+2?", "completion": "5\n#### 5", "label": False, "id": 7},
            {"prompt": "Say hi.", "completion": "hi", "reward": 0.25},  # our reward on a TRL row
            {"prompt": "Say hi.", "completion": "yo", "label": True, "correct": False},  # ours wins (label's output)
        ],
        [
            {"prompt": "What is 2+2?", "response": "4\n#### 4", "correct": True},
            {"prompt": "What is 2+2?", "response": "5\n#### 5", "correct": False, "id": 7},
            {"prompt": "Say hi.", "response": "hi", "reward": 0.25},
            {"prompt": "Say hi.", "response": "yo", "correct": False},
        ],
        True,
    ),
    "conversational_prompt_completion": (
        [
            {"prompt": [SYS, _user("2+2?")], "completion": [_bot("4 😀")], "label": True},
            {"prompt": [_user("2+2?")], "completion": [_bot("five")], "label": False, "prompt_id": "q1"},
        ],
        [
            {"prompt": [SYS, _user("2+2?")], "response": "4 😀", "correct": True},
            {"prompt": [_user("2+2?")], "response": "five", "correct": False, "prompt_id": "q1"},
        ],
        True,
    ),
    "messages": (
        [
            {"messages": [SYS, _user("Étape 1?"), _bot("12.")], "label": True},
            {"messages": [_user("a"), _bot("b"), _user("c"), _bot("d")], "label": False},
        ],
        [
            {"prompt": [SYS, _user("Étape 1?")], "response": "12.", "correct": True},
            {"prompt": [_user("a"), _bot("b"), _user("c")], "response": "d", "correct": False},
        ],
        True,
    ),
    "preference_standard": (
        [
            {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
            {"prompt": "3+3?", "chosen": "6", "rejected": "7", "score_chosen": 9.0},
        ],
        [
            {"prompt": "2+2?", "response": "4", "correct": True},
            {"prompt": "2+2?", "response": "5", "correct": False},
            {"prompt": "3+3?", "response": "6", "correct": True, "score_chosen": 9.0},
            {"prompt": "3+3?", "response": "7", "correct": False, "score_chosen": 9.0},
        ],
        False,
    ),
    "preference_conversational": (
        [{"prompt": [SYS, _user("2+2?")], "chosen": [_bot("4")], "rejected": [_bot("5")]}],
        [
            {"prompt": [SYS, _user("2+2?")], "response": "4", "correct": True},
            {"prompt": [SYS, _user("2+2?")], "response": "5", "correct": False},
        ],
        False,
    ),
    "preference_implicit_prompt": (
        [
            {
                "chosen": [_user("a"), _bot("b"), _user("2+2?"), _bot("4")],
                "rejected": [_user("a"), _bot("b"), _user("2+2?"), _bot("22")],
            }
        ],
        [
            {"prompt": [_user("a"), _bot("b"), _user("2+2?")], "response": "4", "correct": True},
            {"prompt": [_user("a"), _bot("b"), _user("2+2?")], "response": "22", "correct": False},
        ],
        False,
    ),
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_trl_format_gives_the_native_tokens(tmp_path, hf_tok_dir, fmt):
    trl, native, one_per_line = FORMATS[fmt]
    _same_dataset(
        _run(tmp_path, trl, "trl", hf_tok_dir), _run(tmp_path, native, "native", hf_tok_dir), same_lines=one_per_line
    )


def test_a_pair_row_is_exactly_one_dpo_pair(tmp_path, hf_tok_dir):
    rows = [{"prompt": f"{i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(5)]
    ds = TrajectoryDataset(_run(tmp_path, rows, "pairs", hf_tok_dir))
    pairs = build_dpo_pairs(ds.prompt_index, is_positive(ds.correct, ds.outcome_rewards))
    assert pairs.tolist() == [[2 * i, 2 * i + 1] for i in range(5)]
    assert ds.outcome_rewards.tolist() == [1.0, 0.0] * 5 and ds.meta[:, META_FIELDS.index("line")].tolist() == [
        1,
        1,
        2,
        2,
        3,
        3,
        4,
        4,
        5,
        5,
    ]


def test_tables_hold_trl_rows_too(tmp_path, hf_tok_dir):
    """Parquet and `datasets` directories with pair columns: two records per row, like JSONL."""
    import datasets

    trl, native, _ = FORMATS["preference_conversational"]
    ds = datasets.Dataset.from_list(trl)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    want = _run(tmp_path, native, "native", hf_tok_dir)
    _same_dataset(_run(tmp_path, str(tmp_path / "p.parquet"), "pq", hf_tok_dir), want, same_lines=False)
    _same_dataset(_run(tmp_path, str(tmp_path / "saved"), "out_saved", hf_tok_dir), want, same_lines=False)


def _dataset_dict(tmp_path, splits=("train", "test")):
    import datasets

    trl, native, _ = FORMATS["messages"]
    dd = datasets.DatasetDict(
        {s: datasets.Dataset.from_list(trl[i::2] if s == "test" else trl) for i, s in enumerate(splits)}
    )
    path = tmp_path / "dd"
    dd.save_to_disk(str(path))
    return str(path), native


def test_dataset_dict_split(tmp_path, hf_tok_dir):
    path, native = _dataset_dict(tmp_path)
    _same_dataset(_run(tmp_path, path, "train", hf_tok_dir), _run(tmp_path, native, "n_train", hf_tok_dir))
    _same_dataset(
        _run(tmp_path, path, "test", hf_tok_dir, split="test"), _run(tmp_path, native[1:], "n_test", hf_tok_dir)
    )
    with pytest.raises(ValueError, match=r"has no split 'valid'; its splits: \['train', 'test'\]"):
        _run(tmp_path, path, "valid", hf_tok_dir, split="valid")
    assert len(list(read_records(path, split="test"))) == 1
    # the split as a suffix, for the commands without a --split option (label, process-scores, ...)
    _same_dataset(_run(tmp_path, f"{path}@test", "at_test", hf_tok_dir), _run(tmp_path, native[1:], "n_t2", hf_tok_dir))
    with pytest.raises(ValueError, match="the split 'test' in the name and 'train' given as --split disagree"):
        list(read_records(f"{path}@test", split="train"))
    # DIR@test reads DIR: an output inside DIR is refused as for DIR itself (nothing written there)
    from dqo_megatron.data.hf_sources import local_inputs
    from dqo_megatron.outputs import OutputError

    assert local_inputs([f"{path}@test", "openai/gsm8k:main@test"]) == [path]
    tok = TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir))
    inside = PreprocessConfig(inputs=[f"{path}@test"], output_prefix=f"{path}/out", progress=False, tokenize=tok)
    with pytest.raises(OutputError):
        preprocess(inside)
    assert not any(Path(path).glob("*out*"))


def test_dataset_dict_without_train_needs_a_split(tmp_path, hf_tok_dir):
    path, _ = _dataset_dict(tmp_path, splits=("validation", "test"))
    with pytest.raises(ValueError, match=r"splits \['validation', 'test'\] and no 'train': name one") as err:
        _run(tmp_path, path, "x", hf_tok_dir)
    assert "state.json" not in str(err.value)


def test_problems_from_a_dataset_dict(tmp_path):
    import datasets

    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2+2?", "answer": "#### 4"}]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[1:])})
    dd.save_to_disk(str(tmp_path / "gsm8k"))
    assert [p.question for p in load_problems(tmp_path / "gsm8k", split="test")] == ["2+2?"]
    assert len(load_problems(tmp_path / "gsm8k" / "train")) == 2  # a split's own directory
    assert [p.question for p in load_problems(f"{tmp_path / 'gsm8k'}@test")] == ["2+2?"]  # rollout/eval's way
    # eval must not fall on train silently: several splits and none named is an error, not 'no state.json'
    with pytest.raises(ValueError, match=r"holds the splits \['train', 'test'\]: name one as .*gsm8k@SPLIT"):
        load_problems(tmp_path / "gsm8k")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="no `datasets` save_to_disk directory"):
        load_problems(tmp_path / "plain")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Offline as HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 say (the libraries read them at import, so
    their flags are set too), with an empty datasets cache: nothing can reach the network."""
    import datasets
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hub_name_not_cached_is_one_clear_line(tmp_path, hf_tok_dir, offline):
    name = "dqo-megatron-tests/surely-not-cached-0f3a9c"
    with pytest.raises(ValueError) as err:
        _run(tmp_path, name, "hub", hf_tok_dir)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(name) and "not available offline" in msg
    assert "save_to_disk" in msg and "JSONL" in msg
    with pytest.raises(ValueError, match="not available offline"):
        load_problems(name, task="gsm8k")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # a missing file stays a missing file
        _run(tmp_path, str(tmp_path / "missing.jsonl"), "m", hf_tok_dir)


def test_hub_name_from_the_local_cache(tmp_path, hf_tok_dir, offline):
    """A hub dataset in the cache (built here from local files, then filed under an owner/name as the
    hub's downloads are) is read offline, split by split."""
    import datasets

    trl, native, _ = FORMATS["prompt_completion_label"]
    src = tmp_path / "src" / "tiny_trl"
    src.mkdir(parents=True)
    write_jsonl(src / "train.jsonl", trl)
    write_jsonl(src / "test.jsonl", trl[:1])
    datasets.load_dataset(str(src), cache_dir=str(offline))
    (offline / "tiny_trl").rename(offline / "someone___tiny_trl")
    _same_dataset(_run(tmp_path, "someone/tiny_trl", "hub", hf_tok_dir), _run(tmp_path, native, "n", hf_tok_dir))
    _same_dataset(
        _run(tmp_path, "someone/tiny_trl:default", "hub_test", hf_tok_dir, split="test"),
        _run(tmp_path, native[:1], "n_test", hf_tok_dir),
    )


BAD_TRL_ROWS = [
    ({"prompt": "q", "completion": "a", "label": "yes"}, "wrong_type", "label"),
    ({"prompt": "q", "completion": "", "label": True}, "empty_response", "completion"),
    ({"prompt": "q", "completion": 5, "label": True}, "wrong_type", "completion"),
    ({"prompt": "q", "completion": "a"}, "missing_field", "reward"),
    ({"prompt": "q", "completion": "a", "label": 1}, "wrong_type", "label"),
    ({"prompt": [_user("q")], "completion": [_user("a")], "label": True}, "wrong_type", "completion[0].role"),
    ({"prompt": [_user("q")], "completion": [_bot("a"), _bot("b")], "label": True}, "wrong_type", "completion"),
    ({"prompt": [_user("q")], "completion": [_bot(3)], "label": True}, "wrong_type", "completion[0].content"),
    ({"prompt": [{"role": "robot", "content": "q"}], "completion": "a", "label": True}, "wrong_type", "prompt[0].role"),
    ({"messages": [_user("q")], "label": True}, "wrong_type", "messages[0].role"),
    ({"messages": [_bot("a")], "label": True}, "empty_prompt", "messages"),
    ({"messages": [{"role": "user", "content": 5}, _bot("a")], "label": True}, "wrong_type", "messages[0].content"),
    ({"messages": [_user("q"), _bot("")], "label": True}, "empty_response", "messages[1].content"),
    ({"messages": "hi", "label": True}, "wrong_type", "messages"),
    ({"prompt": "q", "chosen": "a"}, "missing_field", "rejected"),
    ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty_response", "rejected"),
    # a problem of the whole pair fails both of its records (two skips)
    ({"chosen": "q a", "rejected": "q b"}, "missing_field", "prompt"),
    ({"chosen": [_user("q"), _bot("a")], "rejected": [_user("r"), _bot("b")]}, "wrong_type", "chosen"),
    ({"chosen": [_user("q"), _bot("a")], "rejected": [_user("q"), _bot(7)]}, "wrong_type", "rejected[1].content"),
    ('{"prompt": "\\ud800", "completion": "a", "label": true}', "invalid_unicode", "prompt"),
]


@pytest.mark.parametrize("row,reason,field", BAD_TRL_ROWS, ids=[f"{r}:{f}" for _, r, f in BAD_TRL_ROWS])
def test_malformed_trl_rows_name_file_line_and_field(tmp_path, row, reason, field):
    good = {"prompt": "ok", "completion": "fine", "label": True}
    path = write_jsonl(tmp_path / "t.jsonl", [good, row, good])
    with pytest.raises(RecordError) as err:
        list(read_records(path))
    assert (err.value.reason, err.value.field, err.value.line) == (reason, field, 2)
    assert str(err.value).startswith(f"{path}:2: field '{field}': ") and str(err.value).endswith(f"[{reason}]")
    skips = SkipCounter()
    kept = list(read_records(path, skip_invalid=True, skips=skips))
    both = "chosen" in row and "rejected" in row and field in ("prompt", "chosen")
    assert skips.counts == {reason: 2 if both else 1} and [r.line for r in kept][0] == 1 and kept[-1].line == 3


def test_a_pair_side_is_converted_once(tmp_path, monkeypatch):
    """The reader converts each side when it splits the pair; parse_record reuses that (also its error)."""
    from dqo_megatron.data import trl_formats
    from dqo_megatron.data.records import parse_record

    calls = []
    convert = trl_formats._pair_side
    monkeypatch.setattr(trl_formats, "_pair_side", lambda row, side: calls.append(side) or convert(row, side))
    good = {"prompt": [_user("q")], "chosen": [_bot("a")], "rejected": [_bot("b")], "id": 7}
    bad = {"prompt": "q", "chosen": "a", "rejected": ""}
    path = write_jsonl(tmp_path / "p.jsonl", [good, bad])
    kept = read_records(path, skip_invalid=True, skips=SkipCounter())
    assert [(r.line, r.response, r.correct) for r in kept] == [(1, "a", True), (1, "b", False), (2, "a", True)]
    assert calls == ["chosen", "rejected"] * 2  # one conversion per side, none in parse_record
    chosen, rejected = trl_formats.pair_sides(bad)
    calls.clear()
    assert parse_record(chosen).response == "a" and dict(chosen)["correct"] is True
    with pytest.raises(RecordError) as err:  # a field error, named in the row's terms
        parse_record(rejected, "p.jsonl", 2)
    assert (err.value.reason, err.value.field) == ("empty_response", "rejected") and calls == []
    malformed = trl_formats.pair_sides({"chosen": "q a", "rejected": "q b"})  # no prompt, none implicit
    calls.clear()
    for side in malformed:  # the conversion's own error, kept from when the side was made
        with pytest.raises(RecordError) as err:
            parse_record(side, "p.jsonl", 3)
        assert (err.value.reason, err.value.field, err.value.line) == ("missing_field", "prompt", 3) and calls == []


def test_malformed_trl_row_stops_preprocess_like_a_native_one(tmp_path, hf_tok_dir):
    rows = [{"messages": [_user("q"), _bot("a")], "label": True}, {"messages": [_user("q")], "label": True}]
    with pytest.raises(RecordError, match=r"trl\.jsonl:2: field 'messages\[0\]\.role': .* \[wrong_type\]"):
        _run(tmp_path, rows, "trl", hf_tok_dir)
    assert json.loads(Path(_run(tmp_path, rows, "skip", hf_tok_dir, skip_invalid=True) + ".json").read_text())[
        "summary"
    ]["skipped"] == {"wrong_type": 1}


def test_label_reads_trl_rows_and_writes_rows_that_read_back(tmp_path, hf_tok_dir):
    """`label` grades TRL rows (a pair as its two records) and what it writes preprocesses like the
    native records with the same verdicts."""
    from dqo_megatron.tasks.label import LabelConfig, label_records

    ref = {"reference_answer": "#### 4", "task": "gsm8k"}
    rows = [
        {"prompt": "2+2?", "completion": "#### 4", "label": False, **ref},  # the check overrides the row's label
        {"messages": [_user("2+2?"), _bot("#### 5")], **ref},
        {"prompt": "2+2?", "chosen": "#### 5", "rejected": "#### 4", **ref},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "labeled.jsonl"
    assert label_records(LabelConfig(inputs=[src], output=str(out), progress=False)).written == 4
    native = [
        {"prompt": p, "response": r, "correct": c, **ref}
        for p, r, c in [("2+2?", "#### 4", True), ([_user("2+2?")], "#### 5", False)]
        + [("2+2?", "#### 5", False), ("2+2?", "#### 4", True)]
    ]
    _same_dataset(_run(tmp_path, str(out), "labeled", hf_tok_dir), _run(tmp_path, native, "native", hf_tok_dir))


def test_pair_rows_through_worker_processes(tmp_path, hf_tok_dir):
    """Pair sides travel to the workers (pickled) and come back in input order: same bytes as one process."""
    trl, native, _ = FORMATS["preference_implicit_prompt"]
    rows = (trl + FORMATS["preference_standard"][0] + FORMATS["messages"][0]) * 5
    one = _run(tmp_path, rows, "one", hf_tok_dir)
    two = _run(tmp_path, str(tmp_path / "one.jsonl"), "two", hf_tok_dir, workers=2, chunk_size=3)
    _same_dataset(one, two)


def test_cli_split_and_offline_hub_name(tmp_path, hf_tok_dir, offline):
    from typer.testing import CliRunner

    from dqo_megatron.cli import app

    path, native = _dataset_dict(tmp_path)
    args = ["preprocess", "-t", hf_tok_dir, "--no-progress"]
    res = CliRunner().invoke(app, [*args, path, "-o", str(tmp_path / "cli" / "test"), "--split", "test"])
    assert res.exit_code == 0, res.output
    _same_dataset(str(tmp_path / "cli" / "test"), _run(tmp_path, native[1:], "n_test", hf_tok_dir))
    res = CliRunner().invoke(app, [*args, "nobody-here/not-cached-9d1e", "-o", str(tmp_path / "cli" / "hub")])
    assert res.exit_code == 2
    err = [line for line in res.output.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: nobody-here/not-cached-9d1e: ") and "offline" in err[0]
