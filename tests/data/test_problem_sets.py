"""Problem loaders: the shared GSM8K/MATH files and a generic JSONL, with clear errors."""

import json

import pytest

from dqo_megatron.tasks.datasets import load_problems
from dqo_megatron.tasks.grading import check_answer


@pytest.mark.parametrize(
    "rel,task,count",
    [
        ("gsm8k/test.jsonl", "gsm8k", 1319),
        ("math/original/test.jsonl", "math", 5000),
        ("math/prm800k_split/test.jsonl", "math", 500),
    ],
)
def test_shared_problem_sets(shared_data, rel, task, count):
    problems = load_problems(shared_data / rel)
    assert len(problems) == count and {p.task for p in problems} == {task}
    assert len({p.id for p in problems}) == count
    # the reference graded against itself is correct (its answer is extractable)
    assert all(check_answer(p.task, p.reference, p.reference).correct for p in problems[:50])
    if task == "math":
        assert {"subject", "level"} <= set(problems[0].metadata)
    assert problems[0].prompt.startswith(problems[0].question + "\n")


def test_generic_jsonl_limit_offset_and_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)) + "\n")
    ps = load_problems(f, task="gsm8k", offset=1, limit=2)
    assert [p.question for p in ps] == ["q1", "q2"] and ps[0].id == "mine:2"
    f.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"mine.jsonl:1: none of the fields"):
        load_problems(f, task="gsm8k")
    with pytest.raises(FileNotFoundError):
        load_problems(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_problems(f, task="chess")
