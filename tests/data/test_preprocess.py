"""records -> preprocess -> TrajectoryDataset gives back exactly what the records say; bad inputs are
reported or counted, never silently lost; output is byte-identical across runs and worker counts."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.indexed import (
    mark_reference_logprobs_filled,
    open_reference_logprobs_for_update,
    stage_reference_logprobs,
)
from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
from dqo_megatron.data.records import RecordError, parse_record
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, TokenizerConfig
from tests.data.conftest import CHAT_TEMPLATE, random_record, write_jsonl


def _bytes_to_unicode() -> dict[str, int]:
    # GPT-2's byte <-> printable-character table, written out here so the check is independent of the code
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _run(tmp_path, rows, tok_path, name="out", workers=1, src=None, **kw):
    src = src or write_jsonl(tmp_path / f"{name}.jsonl", rows)
    tk = {k: kw.pop(k) for k in ("max_length", "overlong", "behavior_logprobs_include_eos") if k in kw}
    cfg = PreprocessConfig(
        inputs=[src],
        output_prefix=str(tmp_path / name / "data"),
        workers=workers,
        progress=False,
        tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok_path), **tk),
        **kw,
    )
    return preprocess(cfg), cfg


def test_roundtrip_hf_exact(tmp_path, hf_tok_dir):
    rng = random.Random(0)
    rows = [random_record(rng, i) for i in range(120)]
    rows.append({"prompt": "p", "response": " ", "reward": 1.0})  # empty-looking response
    for k in (0, 1, 2, 3):  # repeated prompts (each distinct prompt is encoded once per worker)
        copy = {f: v for f, v in rows[k].items() if f not in ("process_rewards", "process_segments")}
        rows.append({**copy, "response": copy["response"] + " again"})
    rows.append({"prompt": "p", "response": "\n\n", "reward": 0.5, "process_rewards": [[1, 0.25], [2, 0.25]]})
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    # behavior log-probs of the right length for half of the records
    for i, r in enumerate(rows):
        if i % 2:
            n = len(tok.hf(r["response"], add_special_tokens=False)["input_ids"]) + 1
            r["behavior_logprobs"] = [-rng.random() for _ in range(n)]
            r["behavior_tokenizer"] = "tiny-bpe"
    summary, cfg = _run(tmp_path, rows, hf_tok_dir, workers=2)
    assert summary.written == len(rows) and summary.skips.total == 0
    ds = TrajectoryDataset(cfg.output_prefix)
    assert len(ds) == len(rows)
    b2u = _bytes_to_unicode()
    for i, row in enumerate(rows):
        item = ds[i]
        msgs = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        p_ids = tok.hf(
            tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False
        )["input_ids"]
        r_ids = tok.hf(row["response"], add_special_tokens=False)["input_ids"]
        assert item["tokens"].tolist() == p_ids + r_ids + [tok.eos_id]
        assert tok.hf.decode(r_ids) == row["response"]  # the response boundary is exact, no text lost
        assert item["prompt_length"] == len(p_ids) and item["loss_mask"].sum() == len(r_ids) + 1
        assert not item["loss_mask"][: len(p_ids)].any()
        # expected rewards: process reward on the token holding the step's last byte, outcome on EOS
        want = np.zeros(len(item["tokens"]), np.float32)
        ends = np.cumsum([len(bytes(b2u[c] for c in t)) for t in tok.hf.convert_ids_to_tokens(r_ids)])
        if "process_segments" in row:
            steps, at = [], 0
            for seg in row["process_segments"]:
                at += len(seg["text"])
                steps.append((at, seg["reward"]))
        else:
            steps = row.get("process_rewards", [])
        for e, v in steps:
            nbytes = len(row["response"][:e].encode("utf-8"))
            j = int(np.searchsorted(ends, nbytes, side="left")) if len(ends) else 0
            want[len(p_ids) + min(j, max(len(r_ids) - 1, 0))] += np.float32(v)
        outcome = row["reward"] if "reward" in row else float(row["correct"])
        want[-1] += np.float32(outcome)
        np.testing.assert_array_equal(item["rewards"], want)
        assert item["correct"] == (int(row["correct"]) if "correct" in row else -1)
        if "behavior_logprobs" in row:
            assert item["has_behavior_logprobs"]
            np.testing.assert_array_equal(item["behavior_logprobs"][len(p_ids) :], np.float32(row["behavior_logprobs"]))
            assert not item["behavior_logprobs"][: len(p_ids)].any()
        else:
            assert not item["has_behavior_logprobs"] and not item["behavior_logprobs"].any()
        assert not item["ref_logprobs"].any()
        assert item["prompt_id"] == row.get("prompt_id", parse_record(json.dumps(row), require_reward=False).prompt_id)
    groups = ds.groups()
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(len(rows)))
    assert all(len({ds[int(d)]["prompt_id"] for d in docs}) == 1 for docs in groups.values())


def test_roundtrip_sentencepiece(tmp_path, sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    rng = random.Random(1)
    rows = [random_record(rng, i) for i in range(80)]
    rows = [r for r in rows if isinstance(r["prompt"], str)]
    rows.append({"prompt": "q", "response": " ", "reward": 1.0, "process_rewards": [[1, 0.5]]})  # no text token at all
    summary, cfg = _run(tmp_path, rows, sp_model)
    assert summary.written == len(rows)
    ds = TrajectoryDataset(cfg.output_prefix)
    assert ds.manifest["dtypes"]["tokens"] == "uint16"
    for i, row in enumerate(rows):
        item = ds[i]
        p_ids, r_ids = [sp.bos_id()] + sp.encode(row["prompt"]), sp.encode(row["response"])
        assert item["tokens"].tolist() == p_ids + r_ids + [sp.eos_id()]
        total = row["reward"] if "reward" in row else float(row["correct"])
        steps = row.get("process_rewards") or []
        if "process_segments" in row:
            steps = [[0, s["reward"]] for s in row["process_segments"] if s["text"]]
        assert np.isclose(item["rewards"].sum(), total + sum(v for _, v in steps), atol=1e-5)
        assert not item["rewards"][: len(p_ids)].any()
        if "process_rewards" in row:  # each step lands on the token that covers the step's last byte
            proto = sp.encode(row["response"], return_type="proto")
            for e, v in row["process_rewards"]:
                nb = len(row["response"][:e].encode())
                cands = [j for j, pc in enumerate(proto.pieces) if pc.begin < nb]
                j = cands[-1] if cands else 0
                assert item["rewards"][len(p_ids) + j] != 0 or v == 0
    last = ds[len(rows) - 1]
    assert last["tokens"].tolist()[-1] == sp.eos_id() and last["rewards"][-1] == np.float32(1.5)  # step -> first (=EOS)


def test_chat_prompt_with_sentencepiece_is_counted(tmp_path, sp_model):
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "response": "a", "reward": 1},
        {"prompt": "hi", "response": "a", "reward": 1},
    ]
    with pytest.raises(RecordError, match=r"out.jsonl:1.*chat_without_template"):
        _run(tmp_path, rows, sp_model)
    summary, _ = _run(tmp_path, rows, sp_model, name="b", skip_invalid=True)
    assert (summary.written, dict(summary.skips.counts)) == (1, {"chat_without_template": 1})


BAD_LINES = {
    "malformed_json": '{"prompt": "p", "response": "r", "reward": 1',
    "missing_field": '{"prompt": "p", "reward": 1}',
    "wrong_type": '{"prompt": "p", "response": 5, "reward": 1}',
    "non_finite": '{"prompt": "p", "response": "r", "reward": NaN}',
    "empty_response": '{"prompt": "p", "response": "", "reward": 1}',
    "behavior_logprobs_length": (
        '{"prompt": "p", "response": "r", "reward": 1, "behavior_logprobs": [-0.1, -0.2, -0.3, -0.4, -0.5]}'
    ),
    "too_long": json.dumps({"prompt": "p " * 300, "response": "r", "reward": 1}),
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_each_bad_input_raises_then_counts(tmp_path, hf_tok_dir, reason):
    good = [{"prompt": f"p{i}", "response": f"answer {i} 日本", "reward": float(i % 2)} for i in range(6)]
    rows = good[:3] + [BAD_LINES[reason]] + good[3:]
    with pytest.raises(RecordError) as info:
        _run(tmp_path, rows, hf_tok_dir, max_length=64)
    assert info.value.reason == reason and info.value.line == 4 and "out.jsonl:4" in str(info.value)
    assert not os.path.exists(tmp_path / "out" / "data.json")  # no half-written output left behind
    assert not list((tmp_path / "out").glob("*.bin"))
    summary, cfg = _run(tmp_path, rows, hf_tok_dir, name="skip", max_length=64, skip_invalid=True, workers=2)
    assert (summary.read, summary.written, dict(summary.skips.counts)) == (7, 6, {reason: 1})
    assert reason in summary.report()
    ds = TrajectoryDataset(cfg.output_prefix)
    assert [ds.prompt_ids[ds[i]["prompt_index"]] for i in range(6)] == [
        parse_record(json.dumps(g)).prompt_id for g in good
    ]
    assert ds.manifest["summary"]["skipped"] == {reason: 1}


def test_overlong_truncates_prompt_left_never_response(tmp_path, hf_tok_dir):
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    long_prompt = "step the answer " * 20
    rows = [
        {"prompt": long_prompt, "response": "42 is the answer", "reward": 1.0},
        {"prompt": "p", "response": "the answer " * 40, "reward": 0.0},
        {"prompt": "short", "response": "ok", "reward": 1.0},
    ]
    summary, cfg = _run(tmp_path, rows, hf_tok_dir, max_length=24, overlong="truncate_prompt_left", skip_invalid=True)
    assert summary.written == 2 and dict(summary.skips.counts) == {"response_too_long": 1}
    assert summary.truncated_prompts == 1
    ds = TrajectoryDataset(cfg.output_prefix)
    full_p = tok.hf(
        tok.hf.apply_chat_template(
            [{"role": "user", "content": long_prompt}], tokenize=False, add_generation_prompt=True
        ),
        add_special_tokens=False,
    )["input_ids"]
    r_ids = tok.hf(rows[0]["response"], add_special_tokens=False)["input_ids"]
    item = ds[0]
    assert len(item["tokens"]) == 24
    assert item["tokens"].tolist() == (full_p + r_ids + [tok.eos_id])[-24:]  # cut on the left only
    assert item["tokens"][item["prompt_length"] :].tolist() == r_ids + [tok.eos_id]
    assert ds.meta[0, 6] == len(full_p) + len(r_ids) + 1 - 24
    s2, _ = _run(tmp_path, rows, hf_tok_dir, name="drop", max_length=24, skip_invalid=True)
    assert s2.written == 1 and dict(s2.skips.counts) == {"too_long": 2}


def test_behavior_logprobs_without_eos_and_tokenizer_mismatch(tmp_path, hf_tok_dir):
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    n = len(tok.hf("the answer", add_special_tokens=False)["input_ids"])
    rows = [
        {"prompt": "p", "response": "the answer", "reward": 1, "behavior_logprobs": [-0.5] * n},
        {
            "prompt": "p",
            "response": "the answer",
            "reward": 1,
            "behavior_logprobs": [-0.5] * (n + 1),
            "behavior_tokenizer": "other-model",
        },
    ]
    summary, cfg = _run(tmp_path, rows, hf_tok_dir, behavior_logprobs_include_eos=False, skip_invalid=True)
    assert summary.written == 1 and dict(summary.skips.counts) == {"behavior_tokenizer_mismatch": 1}
    item = TrajectoryDataset(cfg.output_prefix)[0]
    assert item["behavior_logprobs"][item["prompt_length"] :].tolist() == [-0.5] * n + [0.0]


def test_deterministic_bytes_any_workers(tmp_path, hf_tok_dir):
    rng = random.Random(3)
    rows = [random_record(rng, i) for i in range(300)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    _run(tmp_path, rows, hf_tok_dir, name="a", workers=1, chunk_size=7, src=src)
    _run(tmp_path, rows, hf_tok_dir, name="b", workers=2, chunk_size=50, src=src)
    _run(tmp_path, rows, hf_tok_dir, name="a2", workers=2, chunk_size=7, src=src)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 9  # 4 parts x (.bin, .idx) + manifest (no behavior log-probs in these records)
    for name in files:
        for other in ("b", "a2"):
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (name, other)


def test_reference_logprob_slot_is_writable(tmp_path, hf_tok_dir):
    rows = [{"prompt": "p", "response": "answer " * (i + 1), "reward": 1} for i in range(4)]
    _, cfg = _run(tmp_path, rows, hf_tok_dir)
    slot = Path(cfg.output_prefix + "_ref_logprobs.bin")
    before = slot.read_bytes()
    stage_reference_logprobs(cfg.output_prefix)
    values, starts, lengths = open_reference_logprobs_for_update(cfg.output_prefix)
    for i in range(4):
        values[starts[i] : starts[i] + lengths[i]] = -(i + 1)
    values.flush()
    del values
    # written aside: until marked filled, the dataset's own file is untouched (a killed annotate mixes nothing)
    assert slot.read_bytes() == before
    mark_reference_logprobs_filled(cfg.output_prefix)
    assert slot.read_bytes() != before and sorted(p.name for p in slot.parent.glob(".*")) == []
    ds = TrajectoryDataset(cfg.output_prefix)
    assert ds.manifest["ref_logprobs_filled"]
    for i in range(4):
        assert (ds[i]["ref_logprobs"] == -(i + 1)).all() and len(ds[i]["ref_logprobs"]) == len(ds[i]["tokens"])


def test_config_errors(tmp_path, hf_tok_dir):
    from dqo_megatron.config.loader import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        TokenizerConfig(path=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="max_length"):
        TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir), max_length=1)
    with pytest.raises(ConfigError, match="overlong"):
        TokenizeConfig(tokenizer=TokenizerConfig(path=hf_tok_dir), overlong="cut")
    with pytest.raises(ConfigError, match="workers"):
        PreprocessConfig(inputs=["x"], output_prefix="y", tokenize={"tokenizer": {"path": hf_tok_dir}}, workers=0)
    with pytest.raises(ConfigError, match="inputs"):
        PreprocessConfig(output_prefix="y", tokenize={"tokenizer": {"path": hf_tok_dir}})


def test_all_invalid_is_an_error(tmp_path, hf_tok_dir):
    with pytest.raises(ValueError, match="no valid record"):
        _run(tmp_path, ["{bad"], hf_tok_dir, skip_invalid=True)


def test_chat_template_override(tmp_path, hf_tok_dir):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("[Q]{% for m in messages %}{{ m['content'] }}{% endfor %}[A]")
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir, chat_template=str(tpl)))
    assert tok.render_prompt("hi", {}) == "[Q]hi[A]"
    assert Tokenizer(TokenizerConfig(path=hf_tok_dir)).render_prompt("hi", {}) == "<s><|user|>hi\n<|assistant|>"
    assert CHAT_TEMPLATE in Path(hf_tok_dir, "chat_template.jinja").read_text()


def test_truncated_record_gets_no_eos_and_the_flag(tmp_path, hf_tok_dir):
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    text = "the answer is 42"
    r_ids = tok.hf(text, add_special_tokens=False)["input_ids"]
    n = len(r_ids)
    starts = [a for a, _ in tok.hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    step_token = max(j for j, a in enumerate(starts) if a < 3)  # the token holding "the"'s last character
    assert step_token < n - 1  # ... not the last token, which takes the outcome reward
    rows = [
        {"prompt": "p", "response": text, "reward": 1.0, "behavior_logprobs": [-0.5] * (n + 1)},  # ended: + EOS
        {
            "prompt": "p",
            "response": text,
            "reward": 0.25,
            "truncated": True,
            "behavior_logprobs": [-0.25] * n,
            "process_rewards": [[3, 0.5]],
        },  # cut by the length limit: n log-probs, no EOS
        {"prompt": "q", "response": text, "correct": False, "truncated": True},
    ]
    for include_eos in (True, False):  # a truncated record's log-probs never count an EOS
        if not include_eos:
            rows[0]["behavior_logprobs"] = [-0.5] * n
        name = f"eos{int(include_eos)}"
        summary, cfg = _run(tmp_path, rows, hf_tok_dir, name=name, behavior_logprobs_include_eos=include_eos)
        assert (
            summary.written == 3 and summary.truncated_responses == 2 and "(truncated, no EOS): 2" in summary.report()
        )
        ds = TrajectoryDataset(cfg.output_prefix)
        assert ds.truncated.tolist() == [False, True, True] and ds.truncated.dtype == bool
        assert ds.manifest["summary"]["truncated_responses"] == 2
        assert ds.manifest["num_truncated"] == 2 and ds.manifest["meta_fields"][-1] == "truncated"
        assert ds.meta[:, ds.meta_fields.index("truncated")].tolist() == [0.0, 1.0, 1.0]
        ended, cut, cut_unlabeled = ds[0], ds[1], ds[2]
        P = ended["prompt_length"]
        assert ended["tokens"][P:].tolist() == r_ids + [tok.eos_id] and ended["truncated"] is False
        assert cut["tokens"][P:].tolist() == r_ids and cut["truncated"] is True  # no EOS made up
        assert cut_unlabeled["tokens"][cut_unlabeled["prompt_length"] :].tolist() == r_ids
        assert cut["loss_mask"].sum() == n and cut["behavior_logprobs"][P:].tolist() == [-0.25] * n
        assert ended["behavior_logprobs"][P:].tolist() == [-0.5] * n + ([-0.5] if include_eos else [0.0])
        # the outcome reward still sits on the last token (a response token here), the step on its own token
        assert cut["rewards"][-1] == np.float32(0.25) and cut["rewards"][P + step_token] == np.float32(0.5)
        assert np.isclose(cut["rewards"].sum(), 0.75) and cut_unlabeled["rewards"].sum() == 0.0


def test_truncated_record_errors_name_what_and_where(tmp_path, hf_tok_dir, sp_model):
    tok = Tokenizer(TokenizerConfig(path=hf_tok_dir))
    n = len(tok.hf("the answer", add_special_tokens=False)["input_ids"])
    good = {"prompt": "p", "response": "the answer", "reward": 1.0}
    with_eos = {**good, "truncated": True, "behavior_logprobs": [-0.5] * (n + 1)}  # one value too many
    with pytest.raises(RecordError) as info:
        _run(tmp_path, [good, with_eos], hf_tok_dir)
    e = info.value
    assert (e.reason, e.field, e.line) == ("behavior_logprobs_length", "behavior_logprobs", 2)
    assert f"has {n + 1} values but the response has {n} tokens (truncated: true, so no EOS)" in str(e)
    assert "out.jsonl:2" in str(e)
    # a truncated response that gives no token at all (no EOS either) cannot be a document
    with pytest.raises(RecordError) as info:
        _run(tmp_path, [{"prompt": "q", "response": " ", "reward": 0.0, "truncated": True}], sp_model, name="sp")
    assert (info.value.reason, info.value.field) == ("empty_response", "response") and "sp.jsonl:1" in str(info.value)


def _as_version_1(prefix: str) -> None:
    """Rewrite a dataset as the code before the `truncated` column wrote it: 9 meta columns, manifest v1."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from dqo_megatron.data.indexed import META_FIELDS, META_FIELDS_V1, manifest_path, part_prefix

    ds = TrajectoryDataset(prefix)
    old = ds.meta[:, [META_FIELDS.index(f) for f in META_FIELDS_V1]]
    del ds
    builder = IndexedDatasetBuilder(part_prefix(prefix, "meta") + ".bin", dtype=np.float64)
    for row in old:
        builder.add_document(np.ascontiguousarray(row), [len(row)])
    builder.finalize(part_prefix(prefix, "meta") + ".idx")
    m = json.loads(Path(manifest_path(prefix)).read_text())
    m.update(version=1, meta_fields=list(META_FIELDS_V1))
    m.pop("num_truncated")
    Path(manifest_path(prefix)).write_text(json.dumps(m))


def test_a_dataset_written_before_the_truncated_column_still_loads(tmp_path, hf_tok_dir):
    rows = [
        {"prompt": f"p{i}", "response": f"answer {i}", "reward": float(i % 2), "truncated": i == 1} for i in range(4)
    ]
    _, cfg = _run(tmp_path, rows, hf_tok_dir)
    new = TrajectoryDataset(cfg.output_prefix)
    assert new.truncated.tolist() == [False, True, False, False]
    want = [new[i] for i in range(4)]
    _as_version_1(cfg.output_prefix)
    old = TrajectoryDataset(cfg.output_prefix)
    assert old.manifest["version"] == 1 and old.meta.shape == (4, 9)
    assert old.truncated.dtype == bool and not old.truncated.any()  # every v1 document ended with EOS
    for i in range(4):
        got = old[i]
        assert got["truncated"] is False
        assert {k: v for k, v in got.items() if k != "truncated"}.keys() == {k for k in want[i] if k != "truncated"}
        for k in ("tokens", "rewards", "loss_mask"):
            np.testing.assert_array_equal(got[k], want[i][k])
        assert [got[k] for k in ("prompt_length", "prompt_index", "outcome_reward", "correct")] == [
            want[i][k] for k in ("prompt_length", "prompt_index", "outcome_reward", "correct")
        ]
    # a manifest that claims other columns than the meta file holds is refused, not misread
    m = json.loads(Path(cfg.output_prefix + ".json").read_text())
    m.update(version=2, meta_fields=m["meta_fields"] + ["truncated"])
    Path(cfg.output_prefix + ".json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="rows of widths \\[9\\].*10 fields"):
        TrajectoryDataset(cfg.output_prefix)
    m["version"] = 3
    Path(cfg.output_prefix + ".json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="v3 is not dqo-trajectories v1 or v2"):
        TrajectoryDataset(cfg.output_prefix)
