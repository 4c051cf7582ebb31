"""Held-out evaluation during training: the selection rule, its log, and the picked checkpoint survives pruning."""

from __future__ import annotations

import pytest

from dqo_megatron.config import ConfigError, ParallelConfig, RunConfig, TrainEvalConfig
from dqo_megatron.eval.during_training import check_layout
from dqo_megatron.training.evals import (
    Evaluation,
    append_evaluation,
    best_evaluation,
    build_evaluator,
    read_evaluations,
)


def test_the_rule_picks_the_highest_accuracy_and_the_earliest_on_ties():
    evals = [
        Evaluation(0, 0.40, 40, 100, 1.0),
        Evaluation(25, 0.55, 55, 100, 1.0),
        Evaluation(50, 0.55, 55, 100, 1.0),
        Evaluation(75, 0.50, 50, 100, 1.0),
    ]
    assert best_evaluation(evals).step == 25
    assert best_evaluation(evals[::-1]).step == 25
    assert best_evaluation([]) is None


def test_the_log_keeps_the_last_line_of_a_repeated_step(tmp_path):
    append_evaluation(tmp_path, Evaluation(0, 0.1, 1, 10, 0.5, "ck/step_0"))
    append_evaluation(tmp_path, Evaluation(5, 0.2, 2, 10, 0.5, "ck/step_5"))
    append_evaluation(tmp_path, Evaluation(5, 0.3, 3, 10, 0.5, "ck/step_5"))  # a resumed run measured step 5 again
    got = read_evaluations(tmp_path)
    assert [(e.step, e.accuracy) for e in got] == [(0, 0.1), (5, 0.3)]
    assert got[1].checkpoint == "ck/step_5"


def test_needs_problems_and_a_single_process_layout():
    with pytest.raises(ConfigError, match="eval.problems"):
        TrainEvalConfig(interval=5)
    run = RunConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=2), eval=TrainEvalConfig(problems="p", interval=5)
    )
    with pytest.raises(ConfigError, match="TP = PP = CP = 1"):
        check_layout(run)


def test_pruning_spares_the_kept_steps(tmp_path):
    from dqo_megatron.training.checkpointing import COMPLETE_MARKER, _prune, list_checkpoints, step_dir_name

    for step in (10, 20, 30, 40):
        d = tmp_path / step_dir_name(step)
        d.mkdir()
        (d / COMPLETE_MARKER).write_text("")
    _prune(tmp_path, 40, keep_last=1, keep_steps=[20])
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40]


def test_evaluations_start_when_the_policy_starts_moving():
    from dqo_megatron.training.evals import EvalSchedule

    schedule = EvalSchedule.__new__(EvalSchedule)  # the schedule alone, without loading problems
    schedule.interval, schedule.start, schedule.last_step, schedule.evaluations = 25, 40, 130, []
    schedule.evaluator = object()
    assert [s for s in range(131) if schedule.due(s)] == [40, 65, 90, 115, 130]
    schedule.evaluations.append(Evaluation(65, 0.5, 5, 10, 1.0))  # measured before a resume: not again
    assert not schedule.due(65)


def test_an_interval_without_an_evaluator_is_refused_and_none_is_built_without_one():
    run = RunConfig(eval=TrainEvalConfig(problems="p", interval=5))
    with pytest.raises(ConfigError, match="eval.interval=5 needs an evaluator"):
        build_evaluator(run, None, 0, 1)
    built = []
    assert build_evaluator(run, lambda *a: built.append(a) or "evaluator", 1, 2) == "evaluator"
    assert built == [(run, 1, 2)]
    assert build_evaluator(RunConfig(), lambda *a: built.append(a), 0, 1) is None and len(built) == 1
