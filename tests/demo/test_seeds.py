"""The multi-seed table: mean +- sample std per row, every seed listed, value analysis per row."""

from __future__ import annotations

import math

import pytest

from dqo_megatron.demo.seeds import mean_std, seeds_table, value_table


def _result(seed, dqo_greedy, drop):
    return {
        "config": {"seed": seed, "eval_problems": 500},
        "seconds": 300.0,
        "measured": {
            "accuracy": {"base": {"greedy": 0.3, "sample": 0.4}, "DQO": {"greedy": dqo_greedy, "sample": 0.5}},
            "value_analysis": [
                {"label": "DQO", "pearson": 0.6, "drop": drop, "solvable_change": 0.0, "initial_pearson": 0.5},
                {"label": "DRO", "pearson": None, "drop": None, "solvable_change": None, "initial_pearson": 0.55},
            ],
        },
    }


def test_mean_and_sample_std_against_the_formula():
    values = [0.776, 0.87, 0.916]
    mean = sum(values) / 3
    assert mean_std(values) == pytest.approx((mean, math.sqrt(sum((v - mean) ** 2 for v in values) / 2)))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_tables_list_every_seed_and_the_spread():
    results = [_result(0, 0.80, 0.1), _result(1, 0.90, 0.2)]
    table = seeds_table(results)
    assert "| DQO | 85.0 +- 7.1 | 50.0 +- 0.0 | 80.0 / 90.0 |" in table and "(0, 1)" in table
    values = value_table(results)
    assert "| DQO | 0.600 +- 0.000 | 0.150 +- 0.071 |" in values
    assert "| DRO | n/a (V trained at the prompt only)" in values and "0.550 +- 0.000 |" in values
