"""Bad inputs by class: each is refused with a clear message (file:line and field where a record is at
fault), is skippable and counted where it is one record's fault, and leaves the valid data intact.

Classes: numbers finite in JSON but not representable in the stored dtype (float32 rewards and
log-probs, alone or summed on one token), strings that cannot be encoded (lone UTF-16 surrogates, in
any field, key or nesting level), JSON that Python refuses beyond plain syntax errors (huge integers,
absurd nesting), named special tokens that are not in the vocabulary, and the tokenizer identity that
preprocess records in the manifest."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from dqo_megatron.config import ConfigError
from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
from dqo_megatron.data.records import FLOAT32_LIMIT, RecordError, parse_record
from dqo_megatron.data.tokenize import (
    TOKENIZER_IDENTITY_FILES,
    TokenizeConfig,
    Tokenizer,
    TokenizerConfig,
    tokenizer_difference,
    tokenizer_fingerprint,
)

VALID = [
    {"prompt": "Add 2 and 3.", "response": "2 + 3 = 5. #### 5", "reward": 1.0, "process_rewards": [[6, 0.5]]},
    {"prompt": [{"role": "user", "content": "Say hi."}], "response": "hi", "correct": False},
    {
        "prompt": "Count.",
        "response": "one two three",
        "reward": 0.25,
        "process_segments": [{"text": "one ", "reward": 0.5}, {"text": "two three", "reward": 0.0}],
    },
]
"""Records that every class's file surrounds its bad record with (line 1, 2 and 4 of the file)."""

# (name, bad record, field named in the error). All numbers are finite JSON; each overflows float32.
NOT_REPRESENTABLE = [
    ("reward", {"reward": 1e39}, "reward"),
    ("reward-negative", {"reward": -3.5e38}, "reward"),
    ("reward-int", {"reward": 10**39}, "reward"),
    ("reward-int-beyond-float64", {"reward": 10**400}, "reward"),
    ("process-reward", {"process_rewards": [[1, 2e38], [2, 1e300]]}, "process_rewards[1][1]"),
    ("process-segment", {"process_segments": [{"text": "ab", "reward": -1e39}]}, "process_segments[0].reward"),
    ("behavior-logprob", {"behavior_logprobs": [-0.5, -1e39]}, "behavior_logprobs[1]"),
]
# (name, bad record, field): lone surrogates wherever a string can be
LONE_SURROGATES = [
    ("response", {"response": "ab\ud800"}, "response"),
    ("prompt", {"prompt": "\udfff question"}, "prompt"),
    ("chat-content", {"prompt": [{"role": "user", "content": "x\udc00"}]}, "prompt[0].content"),
    ("reference", {"reference_answer": "#### \ud83d"}, "reference_answer"),
    ("nested-metadata", {"metadata": {"notes": ["ok", {"deep": "\ud800"}]}}, "metadata.notes[1].deep"),
    ("extra-field", {"comment": "\udbff"}, "comment"),
    ("key", {"metadata": {"k\ud800": 1}}, "metadata"),
    ("segment-text", {"response": "a\ud800", "process_segments": [{"text": "a\ud800", "reward": 1}]}, "response"),
]


def _bad_row(patch: dict) -> dict:
    return {"prompt": "Bad one.", "response": "ab", "reward": 0.0, **patch}


def _write(path, rows) -> str:
    # json.dumps escapes lone surrogates as \udxxx (ensure_ascii), which is how they reach real files
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _preprocess(tmp_path, name, rows, tok_dir, workers=1, skip=False, **tok):
    src = _write(tmp_path / f"{name}.jsonl", rows)
    cfg = PreprocessConfig(
        inputs=[src],
        output_prefix=str(tmp_path / name / "data"),
        workers=workers,
        chunk_size=2,
        skip_invalid=skip,
        progress=False,
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok_dir, **tok)),
    )
    return preprocess(cfg), cfg.output_prefix


def _parts(prefix: str) -> dict[str, bytes]:
    return {p: open(f"{prefix}_{p}.bin", "rb").read() for p in ("tokens", "rewards")}


@pytest.fixture(scope="module")
def valid_only(tmp_path_factory, hf_tok_dir):
    """The valid records alone, preprocessed: what every skip run must reproduce byte for byte."""
    tmp = tmp_path_factory.mktemp("valid")
    _summary, prefix = _preprocess(tmp, "valid", VALID, hf_tok_dir)
    return _parts(prefix)


def _assert_refused_then_skipped(tmp_path, hf_tok_dir, valid_only, bad: dict, field: str, reason: str, workers=1):
    rows = VALID[:2] + [bad] + VALID[2:]  # the bad record on line 3
    name = f"bad{workers}"
    with pytest.raises(RecordError) as info:
        _preprocess(tmp_path, name, rows, hf_tok_dir, workers=workers)
    err = info.value
    assert (err.reason, err.field, err.line) == (reason, field, 3)
    assert str(err).startswith(f"{tmp_path / name}.jsonl:3: field '{field}': ")
    assert not os.path.exists(tmp_path / name / "data.json")  # nothing half-written is left as a dataset
    summary, prefix = _preprocess(tmp_path, name + "s", rows, hf_tok_dir, workers=workers, skip=True)
    assert summary.skips.counts == {reason: 1} and summary.written == len(VALID)
    assert f".jsonl:3: field '{field}'" in summary.skips.first[reason]
    assert _parts(prefix) == valid_only  # the valid records are stored exactly as without the bad one
    ds = TrajectoryDataset(prefix)
    assert all(
        np.isfinite(ds[i]["rewards"]).all() and np.isfinite(ds[i]["behavior_logprobs"]).all() for i in range(len(ds))
    )
    assert ds.manifest["summary"]["skipped"] == {reason: 1}


@pytest.mark.parametrize("name,patch,field", NOT_REPRESENTABLE, ids=[c[0] for c in NOT_REPRESENTABLE])
def test_numbers_beyond_float32_are_refused_with_file_line(tmp_path, hf_tok_dir, valid_only, name, patch, field):
    _assert_refused_then_skipped(tmp_path, hf_tok_dir, valid_only, _bad_row(patch), field, "not_representable")


def test_float32_limit_is_exact():
    """The largest accepted value stays finite in float32, the smallest refused one would be inf."""
    below = np.nextafter(FLOAT32_LIMIT, 0)
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(below)) and np.isinf(np.float32(FLOAT32_LIMIT))
    assert parse_record({"prompt": "p", "response": "r", "reward": float(below)}).reward == below
    assert parse_record({"prompt": "p", "response": "r", "reward": -3.4e38}).reward == -3.4e38
    with pytest.raises(RecordError, match="beyond float32"):
        parse_record({"prompt": "p", "response": "r", "reward": FLOAT32_LIMIT})


@pytest.mark.parametrize(
    "patch,field,reason",
    [
        ({"correct": 2**64}, "correct", "wrong_type"),  # a flag, stored as 1/0/-1: only true/false are accepted
        ({"truncated": 10**30}, "truncated", "wrong_type"),
        ({"process_rewards": [[2**64, 1.0]]}, "process_rewards[0]", "bad_process_rewards"),  # an offset past the text
        ({"process_rewards": [[1.0, 1.0]]}, "process_rewards[0]", "wrong_type"),
    ],
    ids=["correct", "truncated", "offset", "float-offset"],
)
def test_integers_beyond_what_is_stored_are_refused(patch, field, reason):
    """Integers that are not rewards are flags or offsets: out-of-range values never reach a column."""
    with pytest.raises(RecordError) as info:
        parse_record(json.dumps(_bad_row(patch)), "ints.jsonl", 9)
    assert (info.value.reason, info.value.field) == (reason, field)
    assert str(info.value).startswith(f"ints.jsonl:9: field '{field}': ")


def test_rewards_that_overflow_only_when_summed_on_one_token(tmp_path, hf_tok_dir, valid_only):
    """Each value fits float32; a truncated record's outcome and last step share its last token."""
    bad = _bad_row({"reward": 3e38, "truncated": True, "process_rewards": [[2, 3e38]]})
    _assert_refused_then_skipped(tmp_path, hf_tok_dir, valid_only, bad, "process_rewards", "not_representable")


# every case in the main process; two of them through worker processes too (-j2: the same code, pickled errors)
_SURROGATE_RUNS = [(*c, 1) for c in LONE_SURROGATES] + [(*c, 2) for c in LONE_SURROGATES if c[0] in ("response", "key")]


@pytest.mark.parametrize("name,patch,field,workers", _SURROGATE_RUNS, ids=[f"{c[0]}-j{c[3]}" for c in _SURROGATE_RUNS])
def test_lone_surrogates_are_refused_with_file_line(tmp_path, hf_tok_dir, valid_only, name, patch, field, workers):
    _assert_refused_then_skipped(
        tmp_path, hf_tok_dir, valid_only, _bad_row(patch), field, "invalid_unicode", workers=workers
    )


def test_paired_surrogate_escapes_are_valid_text():
    rec = parse_record('{"prompt": "p", "response": "\\ud83d\\ude00 \\\\ud800", "reward": 1}')
    assert rec.response == "\U0001f600 \\ud800"  # an emoji, then an escaped backslash: not a surrogate


def test_lone_surrogate_in_a_table_row():
    """Rows that arrive as dicts (Parquet, datasets, callers) are checked as well."""
    with pytest.raises(RecordError, match=r"x\.parquet:7: field 'id': holds a lone surrogate \\ud800"):
        parse_record({"prompt": "p", "response": "r", "reward": 1, "id": "\ud800"}, "x.parquet", 7)


_UNLOADABLE = [
    '{"prompt": "p", "response": "r", "reward": ' + "1" * 5000 + "}",  # beyond Python's digit limit
    '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}",
]  # beyond its recursion limit


@pytest.mark.parametrize("raw", _UNLOADABLE, ids=["5000-digit", "deep"])
def test_json_python_refuses_is_malformed_json_not_a_crash(tmp_path, hf_tok_dir, valid_only, raw):
    rows = VALID[:2] + [raw] + VALID[2:]
    with pytest.raises(RecordError, match=r"\.jsonl:3: not valid JSON.*\[malformed_json\]"):
        _preprocess(tmp_path, "raw", rows, hf_tok_dir)
    summary, prefix = _preprocess(tmp_path, "raws", rows, hf_tok_dir, skip=True)
    assert summary.skips.counts == {"malformed_json": 1} and _parts(prefix) == valid_only


def test_label_skips_lone_surrogates_and_writes_valid_utf8(tmp_path):
    """`label` (and process-scores) read records through the same parse_record."""
    from dqo_megatron.tasks.label import LabelConfig, label_records

    good = {"prompt": "q", "response": "so #### 5", "reference_answer": "#### 5", "task": "gsm8k"}
    src = _write(tmp_path / "in.jsonl", [good, {**good, "response": "#### 5 \ud800"}, good])
    with pytest.raises(RecordError, match=r"in\.jsonl:2: field 'response': holds a lone surrogate"):
        label_records(LabelConfig(inputs=[src], output=str(tmp_path / "out.jsonl"), progress=False))
    summary = label_records(
        LabelConfig(inputs=[src], output=str(tmp_path / "out.jsonl"), progress=False, skip_invalid=True)
    )
    assert summary.written == 2 and summary.skips.counts == {"invalid_unicode": 1}
    lines = (tmp_path / "out.jsonl").read_bytes().decode("utf-8").splitlines()
    assert [json.loads(x)["correct"] for x in lines] == [True, True]


# ---------------------------------------------------------------------------------------- special tokens
@pytest.mark.parametrize("which", ["hf", "sentencepiece"])
def test_an_eos_token_that_does_not_exist_is_refused(which, hf_tok_dir, request, tmp_path):
    path = hf_tok_dir if which == "hf" else request.getfixturevalue("sp_model")
    for token in ("<end_of_turn>", "<|im_end|>", "definitely not one token"):
        with pytest.raises(ConfigError, match=rf"eos_token={token!r} is not a token of tokenizer") as info:
            Tokenizer(TokenizerConfig(path=path, eos_token=token))
        assert path in str(info.value) and "</s>" in str(info.value)  # names the tokenizer and its real EOS
    tok = Tokenizer(TokenizerConfig(path=path, eos_token="</s>"))
    assert tok.eos_id == Tokenizer(TokenizerConfig(path=path)).eos_id
    with pytest.raises(ConfigError, match="not a token of tokenizer"):  # preprocess refuses before writing
        _preprocess(tmp_path, "eos", VALID[:1], path, eos_token="<end_of_turn>")
    assert not os.path.exists(tmp_path / "eos")


# ---------------------------------------------------------------------------------------- tokenizer identity
def test_manifest_records_the_tokenizer_hash(tmp_path, hf_tok_dir):
    _summary, prefix = _preprocess(tmp_path, "m", VALID, hf_tok_dir)
    recorded = json.load(open(prefix + ".json"))["tokenizer"]
    fp = tokenizer_fingerprint(hf_tok_dir)
    assert recorded["sha256"] == fp["sha256"] and recorded["files"] == fp["files"]
    assert set(fp["files"]) <= set(TOKENIZER_IDENTITY_FILES) and "tokenizer.json" in fp["files"]
    # a checkpoint's hf/ copy (what convert does: the same files, plus config.json) is the same tokenizer
    copy = tmp_path / "ckpt" / "hf"
    copy.mkdir(parents=True)
    for name in fp["files"]:
        shutil.copy2(os.path.join(hf_tok_dir, name), copy / name)
    (copy / "config.json").write_text("{}")
    assert tokenizer_fingerprint(str(copy)) == fp
    # another template in tokenizer_config.json is another tokenizer, and the message says which file
    cfg = json.loads((copy / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<pad>"
    (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokenizer_difference(fp, tokenizer_fingerprint(str(copy))) == "tokenizer_config.json differ"


def test_the_identity_files_are_what_conversion_copies():
    import inspect

    from dqo_megatron.conversion.hf_io import copy_side_files
    from dqo_megatron.tokenizer_files import COPIED_FILES

    assert inspect.signature(copy_side_files).parameters["names"].default == COPIED_FILES
    assert set(TOKENIZER_IDENTITY_FILES) == set(COPIED_FILES) - {"generation_config.json"}


def test_a_lone_sentencepiece_model_matches_the_directory_around_it(tmp_path, sp_model):
    lone = tokenizer_fingerprint(sp_model)
    d = tmp_path / "hf"
    d.mkdir()
    shutil.copy2(sp_model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text("{}")
    assert tokenizer_difference(lone, tokenizer_fingerprint(str(d))) is None
    (d / "tokenizer.model").write_bytes(b"another model")
    assert tokenizer_difference(lone, tokenizer_fingerprint(str(d))) == "tokenizer.model differ"
