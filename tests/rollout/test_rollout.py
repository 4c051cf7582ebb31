"""`run_rollout` / `dqo-megatron rollout`: valid records with the sampler model's raw log-probs (by default),
length-cut samples marked truncated, preprocessing accepts them aligned, resuming after a torn write or a
SIGKILL gives exactly the uninterrupted output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dqo_megatron.config import ConfigError
from dqo_megatron.data.records import parse_record
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.rollout import run_rollout
from dqo_megatron.rollout.sampling import derive_seed
from tests.rollout.conftest import CHAT_TEMPLATE, write_problems
from tests.rollout.reference import reference_token_logprobs

REPO = Path(__file__).resolve().parents[2]


def _cfg(model_and_tok, problems, output, **kw) -> RolloutConfig:
    model, tok = model_and_tok
    base = dict(
        problems=problems,
        output=str(output),
        model=model,
        tokenizer=tok,
        backend="transformers",
        device="cpu",
        n=4,
        max_new_tokens=16,
        progress=False,
    )
    base.update(kw)
    return RolloutConfig(**base)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_records_are_valid_and_carry_the_sampler_logprobs(random_hf, story_problems, tmp_path):
    import sentencepiece
    from transformers import AutoModelForCausalLM

    # every knob away from 1 / off, so the raw and the sampled log-probs differ on every token
    cfg = _cfg(random_hf, story_problems, tmp_path / "out.jsonl", label=True, n=6, temperature=0.8)
    assert cfg.behavior_logprobs == "raw" and (cfg.top_k, cfg.top_p) == (16, 0.9)
    summary = run_rollout(cfg)
    recs = _lines(cfg.output)
    assert summary.samples == 18 and summary.written == len(recs) == 18 - sum(summary.dropped.values())
    assert sum(summary.logprobs_omitted.values()) == sum("behavior_logprobs" not in r for r in recs)
    model = AutoModelForCausalLM.from_pretrained(random_hf[0], dtype=torch.float32).eval()

    sp = sentencepiece.SentencePieceProcessor(model_file=random_hf[1])
    ids_seen, checked, checked_truncated, differ = set(), 0, 0, 0
    for line, rec in enumerate(recs, 1):
        parsed = parse_record(json.dumps(rec), "out.jsonl", line, require_reward=True)  # labeled inline
        meta = rec["metadata"]
        assert rec["id"] == f"{rec['prompt_id']}#{meta['sample_index']}" and rec["id"] not in ids_seen
        ids_seen.add(rec["id"])
        assert (
            rec["behavior_tokenizer"] == "tok512.model" and rec["task"] == "gsm8k" and meta["backend"] == "transformers"
        )
        assert rec["label_reason"] in ("no_answer", "wrong") and rec["reward"] == 0.0 and parsed.correct is False
        assert isinstance(rec["prompt"], str)  # sentencepiece: no chat template -> text prompts
        assert meta["group_size"] == sum(r["prompt_id"] == rec["prompt_id"] for r in recs)
        truncated = meta["finish_reason"] == "length"
        assert rec.get("truncated", False) is truncated is parsed.truncated  # only length-cut samples carry it
        if "behavior_logprobs" not in rec:
            assert meta["logprobs_omitted"] == "retokenize_mismatch" and "sampled_logprobs" in meta
            continue
        # aligned: the response re-encodes to the generated ids; one log-prob per token, + EOS unless truncated
        response_ids = sp.encode(rec["response"]) + ([] if truncated else [2])
        assert len(rec["behavior_logprobs"]) == len(response_ids) == meta["num_tokens"]
        prompt_ids = [1] + sp.encode(rec["prompt"])
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + response_ids])).logits[0, len(prompt_ids) - 1 :]
        raw, proc = reference_token_logprobs(logits[: len(response_ids)], response_ids, 0.8, 16, 0.9)
        # the default: behavior_logprobs are the model's own (raw) log-probs; the sampled ones go to metadata
        assert max(abs(a - b) for a, b in zip(raw, rec["behavior_logprobs"])) < 1e-5
        assert max(abs(a - b) for a, b in zip(proc, meta["sampled_logprobs"])) < 1e-5
        assert "raw_logprobs" not in meta
        differ += max(abs(a - b) for a, b in zip(raw, proc)) > 1e-2
        checked += 1
        checked_truncated += truncated
    assert checked >= 5 and checked_truncated >= 1 and differ == checked
    assert summary.truncated == sum(bool(r.get("truncated")) for r in recs)


def test_behavior_logprobs_sampled_and_none(random_hf, story_problems, tmp_path):
    sampled = _lines(
        run_rollout(_cfg(random_hf, story_problems, tmp_path / "s.jsonl", behavior_logprobs="sampled")).output
    )
    none = _lines(
        run_rollout(_cfg(random_hf, story_problems, tmp_path / "none.jsonl", behavior_logprobs="none")).output
    )
    raw = _lines(run_rollout(_cfg(random_hf, story_problems, tmp_path / "raw.jsonl")).output)  # the default
    assert [r["response"] for r in raw] == [r["response"] for r in none] == [r["response"] for r in sampled]
    assert (
        [r.get("truncated") for r in raw] == [r.get("truncated") for r in none] == [r.get("truncated") for r in sampled]
    )
    for r, n, s in zip(raw, none, sampled):
        assert "behavior_logprobs" not in n and "logprobs_omitted" not in n["metadata"]
        assert n["metadata"]["raw_logprobs"] == r.get("behavior_logprobs", r["metadata"].get("raw_logprobs"))
        assert n["metadata"]["sampled_logprobs"] == s.get("behavior_logprobs", s["metadata"].get("sampled_logprobs"))
        if "behavior_logprobs" in s:
            assert r["behavior_logprobs"] == s["metadata"]["raw_logprobs"]
            assert r["metadata"]["sampled_logprobs"] == s["behavior_logprobs"]


@pytest.mark.parametrize("chat", [False, True], ids=["sentencepiece-text", "hf-chat-template"])
def test_preprocess_accepts_the_output_aligned(random_hf, story_problems, tmp_path, chat):
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.data.preprocess import PreprocessConfig, preprocess
    from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig
    from dqo_megatron.rollout.factory import build_backend
    from dqo_megatron.rollout.framing import encode_prompts

    # chat: an HF tokenizer with a chat template (the stories sentencepiece model written as one, as an export
    # writes it: a directory with only tokenizer.model is read with sentencepiece); same model weights
    tok = random_hf[1]
    if chat:
        from dqo_megatron.conversion.hf_tokenizer import write_sentencepiece_tokenizer

        tok = str(tmp_path / "hf-tokenizer")
        write_sentencepiece_tokenizer(random_hf[1], tok)
    template = CHAT_TEMPLATE if chat else None
    cfg = _cfg((random_hf[0], tok), story_problems, tmp_path / "out.jsonl", label=True, chat_template=template, n=6)
    run_rollout(cfg)
    recs = _lines(cfg.output)
    assert isinstance(recs[0]["prompt"], list) == chat
    prefix = str(tmp_path / "data")
    summary = preprocess(
        PreprocessConfig(
            inputs=[cfg.output],
            output_prefix=prefix,
            progress=False,
            tokenize=TokenizeConfig(tokenizer=TokenizerConfig(path=tok, chat_template=template)),
        )
    )
    assert summary.written == len(recs) and summary.skips.total == 0
    ds = TrajectoryDataset(prefix)
    backend = build_backend("transformers", random_hf[0], tok, device="cpu", chat_template=template)
    try:
        aligned = aligned_truncated = 0
        for pid in sorted({r["prompt_id"] for r in recs}):
            group = [(i, r) for i, r in enumerate(recs) if r["prompt_id"] == pid]
            (completions,) = backend.generate(
                [group[0][1]["prompt"]], cfg.sampling_params(), seeds=[derive_seed("problem", cfg.seed, pid)]
            )
            (prompt_ids,), _ = encode_prompts(backend.tokenizer, [group[0][1]["prompt"]])
            for i, rec in group:
                doc = ds[i]
                P = doc["prompt_length"]
                assert doc["tokens"][:P].tolist() == prompt_ids  # the model saw what preprocessing writes
                assert doc["has_behavior_logprobs"] == ("behavior_logprobs" in rec)
                assert doc["truncated"] == rec.get("truncated", False) == (rec["metadata"]["finish_reason"] == "length")
                if "behavior_logprobs" in rec:
                    c = completions[rec["metadata"]["sample_index"]]
                    # ... and generated what it writes (ending with EOS, or cut without one when truncated)
                    assert doc["tokens"][P:].tolist() == c.token_ids
                    torch.testing.assert_close(
                        torch.from_numpy(doc["behavior_logprobs"][P:]),
                        torch.tensor(rec["behavior_logprobs"], dtype=torch.float32),
                    )
                    aligned += 1
                    aligned_truncated += doc["truncated"]
        assert aligned >= 3 and aligned_truncated >= 1
    finally:
        backend.close()


def _assert_same_records(path, ref_path) -> None:
    """The same records in the same order; log-probs equal up to the float rounding that batching changes
    (a resumed run batches other problems together: the samples are the same, float32 logits of magnitude
    ~17 differ by ~1e-5 between matrix shapes)."""
    got, ref = _lines(path), _lines(ref_path)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        for rec in (a, b):
            rec["lp"] = (
                rec.pop("behavior_logprobs", [])
                + rec["metadata"].pop("raw_logprobs", [])
                + rec["metadata"].pop("sampled_logprobs", [])
            )
        assert len(a["lp"]) == len(b["lp"]) and max([abs(x - y) for x, y in zip(a.pop("lp"), b.pop("lp"))] + [0]) < 1e-4
        assert a == b


def _tear(path: Path, keep_groups: int) -> None:
    """Leave `keep_groups` complete problems, then half of the next one's lines and a torn line (a kill mid-write)."""
    lines = path.read_text().splitlines(keepends=True)
    out, groups, k = [], 0, 0
    while groups < keep_groups:
        size = json.loads(lines[k])["metadata"]["group_size"]
        out += lines[k : k + size]
        k += size
        groups += 1
    size = json.loads(lines[k])["metadata"]["group_size"]
    out += lines[k : k + size // 2] + [lines[k + size // 2][:25]]
    path.write_text("".join(out))


def test_resume_after_a_torn_write_reproduces_the_uninterrupted_output(stories_hf, story_problems, tmp_path):
    full = _cfg(stories_hf, story_problems, tmp_path / "full.jsonl", n=3, max_new_tokens=12)
    run_rollout(full)
    part = tmp_path / "part.jsonl"
    Path(str(part) + ".meta.json").write_text(Path(full.output + ".meta.json").read_text())
    part.write_text(Path(full.output).read_text())
    _tear(part, keep_groups=1)
    summary = run_rollout(_cfg(stories_hf, story_problems, part, n=3, max_new_tokens=12, batch_size=2))
    assert summary.resumed_problems == 1 and summary.generated_problems == 2 and summary.truncated_bytes > 0
    _assert_same_records(part, full.output)
    before = part.read_bytes()
    again = run_rollout(_cfg(stories_hf, story_problems, part, n=3, max_new_tokens=12))
    assert again.generated_problems == 0 and again.truncated_bytes == 0 and part.read_bytes() == before


def test_resume_refuses_other_settings(stories_hf, story_problems, tmp_path):
    cfg = _cfg(stories_hf, story_problems, tmp_path / "out.jsonl", n=2, max_new_tokens=4)
    run_rollout(cfg)
    with pytest.raises(ConfigError, match=r"other settings \(n: 2 there, 3 now"):
        run_rollout(_cfg(stories_hf, story_problems, cfg.output, n=3, max_new_tokens=4))
    with pytest.raises(ConfigError, match="other settings"):  # refused before any model is loaded
        run_rollout(
            _cfg((str(tmp_path / "no-model"), stories_hf[1]), story_problems, cfg.output, n=3, max_new_tokens=4)
        )
    assert run_rollout(_cfg(stories_hf, story_problems, cfg.output, n=3, max_new_tokens=4, overwrite=True)).written == 9
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "x", "response": "y"}\n')
    with pytest.raises(ConfigError, match="without foreign.jsonl.meta.json"):
        run_rollout(_cfg(stories_hf, story_problems, foreign))


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_mid_run_then_restart_gives_exactly_n_per_problem(stories_hf, tmp_path):
    model, tok = stories_hf
    problems = write_problems(tmp_path / "problems.jsonl", [f"Story number {i}." for i in range(8)])
    out = tmp_path / "killed.jsonl"
    args = [
        sys.executable,
        "-m",
        "dqo_megatron",
        "rollout",
        problems,
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
        "-n",
        "4",
        "--max-new-tokens",
        "48",
        "--problems-per-call",
        "1",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while _count_lines(out) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group, as a scheduler would
    finally:
        proc.wait(timeout=30)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL, (
        f"the rollout ended before the kill ({proc.returncode}): {stderr[-2000:]}"
    )
    killed_at = _count_lines(out)
    assert 6 <= killed_at < 32, killed_at
    summary = run_rollout(_cfg(stories_hf, problems, out, n=4, max_new_tokens=48, problems_per_call=1))
    assert summary.resumed_problems >= 1 and summary.resumed_problems + summary.generated_problems == 8
    recs = _lines(out)
    assert Counter(r["prompt_id"] for r in recs) == {f"p{i}": 4 for i in range(8)}
    assert len({r["id"] for r in recs}) == 32
    reference = tmp_path / "uninterrupted.jsonl"
    run_rollout(_cfg(stories_hf, problems, reference, n=4, max_new_tokens=48))
    _assert_same_records(out, reference)


def test_cli(random_hf, story_problems, tmp_path):
    from dqo_megatron.cli import app

    model, tok = random_hf
    out = tmp_path / "cli.jsonl"
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "rollout",
            story_problems,
            "-o",
            str(out),
            "-m",
            model,
            "-t",
            tok,
            "--backend",
            "transformers",
            "-n",
            "2",
            "--max-new-tokens",
            "8",
            "--label",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "problems: 3 (0 already done, 3 sampled now)" in r.output and "samples/s" in r.output
    assert all(parse_record(line, require_reward=True) for line in out.read_text().splitlines())
    bad = runner.invoke(
        app, ["rollout", story_problems, "-o", str(tmp_path / "x.jsonl"), "-m", model, "-t", tok, "--temperature", "0"]
    )
    assert bad.exit_code == 2 and "greedy decoding (temperature 0) gives one sample per problem" in bad.output
    missing = runner.invoke(
        app, ["rollout", story_problems, "-o", str(tmp_path / "y.jsonl"), "-m", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_config_errors_name_the_field(tmp_path):
    for kw, field in [
        ({"n": 0}, "n=0"),
        ({"top_p": 0.0}, "top_p"),
        ({"behavior_logprobs": "both"}, "behavior_logprobs"),
        ({"backend": "tgi"}, "backend"),
        ({"limit": 0}, "limit"),
        ({"problems": ""}, "problems"),
    ]:
        base = dict(problems="p.jsonl", output=str(tmp_path / "o.jsonl"))
        base.update(kw)
        with pytest.raises(ConfigError, match=field):
            RolloutConfig(**base)


class _UntemplatedBackend:
    """A backend whose tokenizer has no chat template; records whether the rollout closed it."""

    name = "stub"
    templated = False
    closed = False

    def close(self):
        self.closed = True


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prompt_format": "chat"}, "prompt_format=chat, but the tokenizer has no chat template"),
        ({"system_prompt": "Be brief."}, "system_prompt needs chat prompts"),
    ],
    ids=["chat-without-template", "system-prompt-without-template"],
)
def test_a_prompt_format_the_tokenizer_cannot_give_is_a_config_error(story_problems, tmp_path, settings, message):
    backend = _UntemplatedBackend()
    cfg = _cfg(("unused-model", "unused-tokenizer"), story_problems, tmp_path / "out.jsonl", **settings)
    with pytest.raises(ConfigError, match=message):
        run_rollout(cfg, backend=backend)
    assert not (tmp_path / "out.jsonl").exists()
    assert not backend.closed  # a backend the caller gave stays the caller's to close
