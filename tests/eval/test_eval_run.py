"""evaluate() with stub models on the shared test sets: table, JSON, PNG, per-problem outputs, cache, factory."""

from __future__ import annotations

import json

import pytest

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.eval import EvalConfig, evaluate
from dqo_megatron.eval.run import select
from dqo_megatron.tasks.datasets import load_problems
from tests.eval.stubs import StubBackend

LIMIT = 6


@pytest.fixture(scope="module")
def references(shared_data):
    """prompt -> reference solution for the problems the runs below evaluate."""
    refs = {}
    for rel in ("gsm8k/test.jsonl", "math/original/test.jsonl", "math/prm800k_split/test.jsonl"):
        for p in load_problems(shared_data / rel):
            refs[p.prompt] = p.reference
    return refs


def oracle(references):
    """Greedy: the reference solution (always right). Sampled: sample 0 right, sample 1 wrong (50%)."""
    return StubBackend(
        lambda prompt, prefix, seed, j, params: (
            references[prompt] if params.greedy or j == 0 else "#### -12345\n\\boxed{-12345}"
        )
    )


def cfg_for(tmp_path, shared_data, **kw):
    args = dict(
        models=["/ckpt/oracle", "/ckpt/wrong"],
        names=["oracle", "wrong"],
        output_dir=str(tmp_path / "eval"),
        data_dir=str(shared_data),
        limit=LIMIT,
        num_samples=2,
        progress=False,
    )
    return EvalConfig(**(args | kw))


def test_table_json_png_and_outputs(tmp_path, shared_data, references):
    cfg = cfg_for(tmp_path, shared_data)
    stubs = [oracle(references), StubBackend(lambda *a: "I do not know.")]
    res = evaluate(cfg, stubs)
    for ds in ("gsm8k", "math", "math500"):
        assert res.accuracy("oracle", ds, "greedy") == 1.0 and res.accuracy("oracle", ds, "sample") == 0.5
        assert res.accuracy("wrong", ds, "greedy") == 0.0
    out = tmp_path / "eval"
    md = (out / "results.md").read_text()
    assert "| model | GSM8K greedy | GSM8K sample | MATH greedy | MATH sample | MATH500 greedy | MATH500 sample |" in md
    assert "| oracle | 100.00 | 50.00 | 100.00 | 50.00 | 100.00 | 50.00 |" in md
    assert "| wrong | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 | 0.00 |" in md
    assert "## MATH by subject (%)" in md and "## MATH500 by level (%)" in md
    assert "top_p 0.9, top_k 16, 2 sample(s) per problem" in md
    # spread selection: 6 evenly spaced MATH problems cover several subjects
    math_problems = select(load_problems(shared_data / "math/original/test.jsonl"), LIMIT, "spread")
    subjects = sorted({p.metadata["subject"] for p in math_problems})
    assert len(subjects) >= 5 and all(f" {s} " in md for s in subjects)
    doc = json.loads((out / "results.json").read_text())
    assert doc["results"]["oracle"]["math"]["sample"]["accuracy"] == 0.5
    assert doc["results"]["oracle"]["math"]["greedy"]["by_subject"][subjects[0]]["accuracy"] == 1.0
    assert doc["decodings"]["sample"] == {
        "n": 2,
        "temperature": 1.0,
        "top_p": 0.9,
        "top_k": 16,
        "max_new_tokens": 1024,
        "stop": [],
    }
    assert [d["problems"] for d in doc["datasets"]] == [LIMIT] * 3
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(out / "outputs" / "oracle" / "math.sample.jsonl")]
    assert len(rows) == LIMIT and rows[0]["correct"] == [True, False] and rows[0]["score"] == 0.5
    assert rows[0]["finish_reasons"] == ["eos", "eos"] and rows[0]["subject"] == math_problems[0].metadata["subject"]
    # greedy calls ask for temperature 0 and one sample; the sampled calls for the paper's settings
    params = {c["params"].temperature: c["params"] for c in stubs[0].calls}
    assert params[0.0].n == 1 and (params[1.0].top_p, params[1.0].top_k, params[1.0].n) == (0.9, 16, 2)


def test_cache_resumes_and_shares_prompts(tmp_path, shared_data, references):
    cfg = cfg_for(
        tmp_path,
        shared_data,
        models=["/ckpt/oracle"],
        names=["oracle"],
        decodings=["greedy"],
        datasets=["math500", f"again={shared_data}/math/prm800k_split/test.jsonl"],
    )
    first = oracle(references)
    evaluate(cfg, [first], write=False)
    assert first.generated == LIMIT  # the two datasets hold the same prompts: generated once
    again = oracle(references)
    evaluate(cfg, [again], write=False)
    assert again.generated == 0
    more = oracle(references)
    res = evaluate(
        cfg_for(
            tmp_path,
            shared_data,
            models=["/ckpt/oracle"],
            names=["oracle"],
            decodings=["greedy"],
            datasets=["math500"],
            limit=LIMIT * 2,
            limit_mode="first",
        ),
        [more],
        write=False,
    )
    # "first 12" overlaps "spread 6" of 500 in problem 0 only
    assert more.generated == 2 * LIMIT - 1 and res.accuracy("oracle", "math500", "greedy") == 1.0


def test_factory_builds_and_closes_one_backend_at_a_time(tmp_path, shared_data, references):
    built = []

    def factory(path):
        assert all(b.closed for b in built)  # the previous model is freed first
        built.append(oracle(references))
        return built[-1]

    res = evaluate(cfg_for(tmp_path, shared_data, datasets=["gsm8k"], decodings=["greedy"], limit=2), factory)
    assert len(built) == 2 and all(b.closed for b in built)
    assert res.accuracy("wrong", "gsm8k", "greedy") == 1.0  # both rows were the oracle here


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"models": []}, "models"),
        ({"names": ["a"]}, "names"),
        ({"names": ["a", "a"]}, "unique"),
        ({"datasets": ["svamp"]}, "datasets"),
        ({"decodings": ["beam"]}, "decodings"),
        ({"limit": 0}, "limit"),
        ({"num_samples": 0}, "num_samples"),
        ({"top_k": -1}, "sampling"),
        ({"temperature": 0}, "temperature"),
        ({"output_dir": ""}, "output_dir"),
        ({"limit_mode": "random"}, "limit_mode"),
    ],
)
def test_config_errors_name_the_field(tmp_path, kw, field):
    args = dict(models=["a", "b"], output_dir=str(tmp_path)) | kw
    with pytest.raises(ConfigError, match=field):
        EvalConfig(**args)


def test_default_names_and_missing_dataset(tmp_path):
    cfg = EvalConfig(models=["/x/base/", "/y/dqo-step100"], output_dir=str(tmp_path), data_dir=str(tmp_path))
    assert cfg.names == ["base", "dqo-step100"]
    with pytest.raises(FileNotFoundError, match="dataset 'gsm8k'.*gsm8k/test.jsonl does not exist"):
        evaluate(cfg, [StubBackend(lambda *a: ""), StubBackend(lambda *a: "")])
