"""Micro-batches by tokens for KTO and under virtual pipeline stages: the step of padded micro-batches.

KTO's KL reference point z0 is estimated on the mismatched rows of each padded micro-batch (a draw of
train.micro_batch_size documents). Cut by tokens, each draw stays whole as a KL group with its own z0
(`kl_group`), so the step equals the padded one while a micro-batch holds several groups. Under
virtual pipeline stages Megatron's interleaved schedule runs micro-batches in groups of PP:
`split_micro_batches` splits the cut until its count is a multiple of PP. Single process, PP2 and
PP2 x VPP2 (gloo, CPU), against the padded step on one process.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dqo_megatron.config import ParallelConfig
from dqo_megatron.training.packing import first_fit_decreasing, split_micro_batches
from tests.helpers.distributed import run_distributed
from tests.helpers.rl_layouts import rl_layout_step, rl_reference_step
from tests.training.test_packing import (  # noqa: F401 - dataset: the fixture
    SEQ,
    _assert_same_gradients,
    _micro_batches,
    _run,
    _step_body,
    dataset,
    padding_fractions,
)
from tests.training.test_packing_layouts import _assert_matches


def _kto_run(draws: int):
    run = _run("kto", 2)
    run.train = dataclasses.replace(run.train, global_batch_size=2 * draws)
    return run


def test_kto_by_tokens_equals_padded_kto(dataset):  # noqa: F811
    """4 draws of 2 documents (+ 2 mismatched rows each) in micro-batches of at most 4 packed rows,
    where KL groups share micro-batches, == the 4 padded micro-batches."""
    padded = _micro_batches(dataset, "kto", packing=False, mbs=2, steps=4)
    budget = _micro_batches(dataset, "kto", packing=True, mbs=2, steps=4, budget_rows=4)
    assert len(budget) < len(padded) and all(b["tokens"].shape[0] <= 4 for b in budget)
    groups = [b["kl_group"].tolist() for b in budget]
    assert sorted(g for group in groups for g in set(group)) == [0, 1, 2, 3], "every KL group once, whole"
    assert max(len(set(group)) for group in groups) > 1, "a micro-batch holds several KL groups"
    for batch in budget:  # documents, then their mismatched rows, group by group
        half = batch["unpack_index"].shape[0] // 2
        assert batch["desirable"].shape == batch["kl_group"].shape == (half,)
    (ref,) = run_distributed(_step_body, 1, _kto_run(4), padded, True, None)
    (got,) = run_distributed(_step_body, 1, _kto_run(4), budget, True, ref["initial"])
    _assert_same_gradients(got, ref)
    for name in ("kl_reference", "kto_loss", "desirable_reward_mean", "undesirable_reward_mean"):
        assert got["metrics"][name] == pytest.approx(ref["metrics"][name], rel=1e-4, abs=1e-6), name


def test_split_micro_batches_reaches_a_multiple_keeping_rows():
    rng = np.random.default_rng(5)
    lengths = [int(n) for n in rng.integers(3, 20, size=14)]
    rows = first_fit_decreasing(lengths, SEQ)
    units = [[d] for d in range(len(lengths))]
    cuts = [([d for row in rows[i : i + 2] for d in row], rows[i : i + 2]) for i in range(0, len(rows), 2)]
    for multiple in (2, 3, 4, 8):
        split = split_micro_batches(cuts, units, multiple)
        assert split == split_micro_batches(cuts, units, multiple), "deterministic"
        assert len(split) % multiple == 0 and len(split) >= len(cuts)
        assert [d for members, _ in split for d in members] == [d for members, _ in cuts for d in members]
        for members, kept in split:
            assert sorted(d for row in kept for d in row) == sorted(members), "each half keeps its documents"
            assert len(kept) <= 2 and all(sum(lengths[d] for d in row) <= SEQ for row in kept)
            assert all(any(set(row) <= set(whole) for whole in rows) for row in kept), "rows of the original"
    pairs = [[0, 1], [2, 3], [4, 5]]  # three pairs in one micro-batch: split whole, never a pair apart
    split = split_micro_batches([([0, 1, 2], [[0, 1, 2, 3], [4, 5]])], pairs, 2)
    assert [members for members, _ in split] == [[0, 1], [2]]
    assert split[1][1] == [[4, 5]]
    with pytest.raises(ValueError, match="one unit each"):
        split_micro_batches([([0], [[0, 1]])], pairs, 2)


def test_vpp_with_micro_batches_by_tokens(dataset):  # noqa: F811
    """PP2 x VPP2: 8 documents by tokens fit one micro-batch of 4 packed rows; Megatron's interleaved
    schedule needs an even count, so it is split in two, == the padded step on one process."""
    unsplit = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, fixed_rows=True, budget_rows=4)
    assert len(unsplit) == 1, "the cut needs a split"
    budget = _micro_batches(
        dataset, "samples", True, mbs=4, steps=2, fixed_rows=True, budget_rows=4, micro_batch_multiple=2
    )
    assert len(budget) == 2 and all(b["tokens"].shape[0] == 4 for b in budget)
    assert [b["unpack_index"].shape[0] for b in budget] == [4, 4]
    run = _run("dqo", 4)
    run.model = dataclasses.replace(run.model, num_layers=4)
    padded = _micro_batches(dataset, "samples", packing=False, mbs=4, steps=2)
    (ref,) = run_distributed(rl_reference_step, 1, run, padded, True)
    run.train.micro_batch_size = 4  # the schedule's micro-batch: 4 rows (per member)
    run.parallel = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    _assert_matches(run_distributed(rl_layout_step, 2, run, budget, True, ref), ref)


def test_kto_by_tokens_under_pp2(dataset):  # noqa: F811
    """PP2: KTO's micro-batches by tokens with fixed rows; the last stage reads kl_group and desirable."""
    padded = _micro_batches(dataset, "kto", packing=False, mbs=2, steps=4)
    budget = _micro_batches(dataset, "kto", packing=True, mbs=2, steps=4, fixed_rows=True, budget_rows=4)
    assert len(budget) < len(padded) and all(b["tokens"].shape[0] == 4 for b in budget)
    (ref,) = run_distributed(rl_reference_step, 1, _kto_run(4), padded, True)
    run = _kto_run(4)
    run.train.micro_batch_size = 4
    run.parallel = ParallelConfig(pipeline_model_parallel_size=2)
    _assert_matches(run_distributed(rl_layout_step, 2, run, budget, True, ref), ref)


def test_a_vpp_step_needs_whole_groups_of_pp_draws():
    from dqo_megatron.config import ConfigError, RunConfig
    from tests.training.test_packing import MODEL

    vpp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    run = _run("dqo", 4)
    run = RunConfig(model=dataclasses.replace(MODEL, num_layers=4), train=run.train, parallel=vpp)
    assert run.num_microbatches(2) == 2
    odd = dataclasses.replace(run.train, global_batch_size=12)
    with pytest.raises(ConfigError, match="interleaved schedule .* = 3 is not a multiple of 2"):
        RunConfig(model=run.model, train=odd, parallel=vpp).num_microbatches(2)


@pytest.mark.parametrize("budget_rows", [None, 1])
def test_step_reports_the_rows_it_computed_and_their_padding(dataset, budget_rows):  # noqa: F811
    """`rows_per_document` and `padding_frac` (what the logger scales FLOPs by, and what packing saves)
    against the packed layout itself: its document ids and unpack index, not `input_tokens`."""
    from dqo_megatron.training.algorithms import input_layout_metrics

    padded = _micro_batches(dataset, "samples", packing=False, mbs=4, steps=2)
    packed = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, budget_rows=budget_rows)

    def reduced(batches):  # Megatron's reduction: numerators and denominators summed, then divided
        totals = {}
        for b in batches:
            for key, value in input_layout_metrics(b["tokens"].shape[0], SEQ, b).items():
                totals[key] = totals.get(key, 0) + value
        return {key: float(num / den) for key, (num, den) in totals.items()}

    rows = sum(b["tokens"].shape[0] for b in packed)
    want_packed = sum(padding_fractions(b)[0] * b["tokens"].shape[0] for b in packed) / rows
    want_padded = sum(padding_fractions(b)[1] * b["unpack_index"].shape[0] for b in packed) / 8
    assert reduced(packed) == pytest.approx({"rows_per_document": rows / 8, "padding_frac": want_packed})
    assert reduced(padded) == pytest.approx({"rows_per_document": 1.0, "padding_frac": want_padded})
    assert rows < 8 and want_packed < want_padded
