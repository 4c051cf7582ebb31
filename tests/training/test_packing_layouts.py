"""Packed micro-batches under TP2, TP2+SP, CP2, PP2 (every algorithm), DP2 and PP2 x VPP2 (gloo, CPU)
give the step of padded ones on one process: loss, gradient norms, every gradient and every weight
after one step, from the same weights.

The reference is the padded step on one process (`rl_reference_step`); each layout runs the packed
micro-batches (`rl_layout_step`). CP2 is the delicate case: the ranks hold chunks r and 2*cp-1-r of
every packed row, build their part of the document mask from the whole rows' document ids, rotate
q/k by their own tokens' positions, and gather the outputs before the loss moves them back to
document rows. Tolerance as in tests/test_rl_step_layouts.py.
"""

from __future__ import annotations

import pytest

from dqo_megatron.algorithms import get as get_algorithm
from dqo_megatron.config import ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.rl_layouts import LR, rl_layout_step, rl_reference_step
from tests.training.test_packing import _micro_batches, _run, dataset  # noqa: F401 - the fixture

REL_TOL = 2e-5
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2-sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp2": dict(context_parallel_size=2),
    "pp2": dict(pipeline_model_parallel_size=2),
}
CASES = [(algorithm, layout) for algorithm in ("dqo", "dro", "dpo", "kto", "sft", "rs") for layout in LAYOUTS]


def _assert_matches(results: list[dict], ref: dict) -> None:
    """Every rank's loss, gradient norms, gradients and weights after the step equal the reference's."""
    grad_scale = max(g.abs().max().item() for g in ref["grads"].values())
    for rank, dev in enumerate(results):
        assert dev["compared"] > 0
        assert dev["loss"] == pytest.approx(ref["loss"], rel=REL_TOL), f"rank {rank} loss"
        assert dev["grad_norm"] == pytest.approx(ref["grad_norm"], rel=REL_TOL), f"rank {rank} grad norm"
        for member, norm in ref["grad_norms"].items():
            assert dev["grad_norms"][member] == pytest.approx(norm, rel=REL_TOL), f"rank {rank} {member} norm"
        assert dev["grads"] <= REL_TOL * grad_scale, f"rank {rank}: grads differ by {dev['grads']:.3g}"
        assert dev["after"] <= REL_TOL * LR * grad_scale + 1e-7, f"rank {rank}: weights differ by {dev['after']:.3g}"


def test_packed_dp2_step_equals_padded_single_process(dataset, references):  # noqa: F811
    """Each data-parallel rank packs its own micro-batch (the reference's first / second)."""
    run = _run("dqo", 4)
    packed = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2)
    ref = references("dqo")
    results = run_distributed(rl_layout_step, 2, run, [[packed[0]], [packed[1]]], True, ref)
    _assert_matches(results, ref)


@pytest.fixture(scope="module")
def references(dataset):  # noqa: F811
    cache = {}

    def get(algorithm):
        if algorithm not in cache:
            algo = get_algorithm(algorithm)
            mbs = 2 if algo.batch_mode == "pairs" else 4
            padded = _micro_batches(dataset, algo.batch_mode, packing=False, mbs=mbs, steps=2)
            (cache[algorithm],) = run_distributed(
                rl_reference_step, 1, _run(algorithm, mbs), padded, algo.needs_reference
            )
        return cache[algorithm]

    return get


@pytest.mark.parametrize("algorithm, layout", CASES, ids=[f"{a}-{layout}" for a, layout in CASES])
def test_packed_layout_step_equals_padded_single_process(algorithm, layout, dataset, references):  # noqa: F811
    algo = get_algorithm(algorithm)
    mbs = 2 if algo.batch_mode == "pairs" else 4
    run = _run(algorithm, mbs)
    run.parallel = ParallelConfig(**LAYOUTS[layout])
    fixed = layout == "pp2"  # pipeline stages exchange fixed shapes
    if fixed:  # the schedule's micro-batch: every row (DPO: chosen + rejected; KTO: + mismatched)
        run.train.micro_batch_size = mbs * algo.rows_per_item
    packed = _micro_batches(dataset, algo.batch_mode, packing=True, mbs=mbs, steps=2, fixed_rows=fixed)
    if not fixed:
        assert sum(b["tokens"].shape[0] for b in packed) < 2 * mbs * algo.rows_per_item
    ref = references(algorithm)
    results = run_distributed(rl_layout_step, 2, run, packed, algo.needs_reference, ref)
    _assert_matches(results, ref)


def test_dp2_ranks_with_different_micro_batch_counts(dataset, references):  # noqa: F811
    """train.micro_batch_tokens: each DP rank cuts its 4 documents into micro-batches of one packed row,
    so the ranks run different numbers of micro-batches in the same step."""
    from dqo_megatron.training.microbatches import MicroBatches

    per_rank = []
    for rank in range(2):
        batches = MicroBatches(
            dataset,
            seq_length=32,
            micro_batch_size=4,
            dp_rank=rank,
            dp_size=2,
            seed=0,
            shuffle=True,
            pad_id=0,
            with_ref_logprobs=False,
            packing=True,
            budget_rows=1,
        )
        per_rank.append(batches.next_step(1))
    assert len(per_rank[0]) != len(per_rank[1]), [len(b) for b in per_rank]
    ref = references("dqo")  # one process, padded: the same 8 documents in 2 micro-batches of 4
    results = run_distributed(rl_layout_step, 2, _run("dqo", 4), per_rank, True, ref)
    _assert_matches(results, ref)


def test_pp2_with_micro_batches_by_tokens(dataset, references):  # noqa: F811
    """Under PP every micro-batch by tokens has the same row count (stages exchange fixed shapes): 8
    documents in 4 micro-batches of one packed row against the padded 2 x 4 on one process."""
    budget = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, fixed_rows=True, budget_rows=1)
    assert len(budget) == 4 and all(b["tokens"].shape[0] == 1 for b in budget)
    run = _run("dqo", 1)  # the schedule's micro-batch: one row (per member)
    run.parallel = ParallelConfig(pipeline_model_parallel_size=2)
    _assert_matches(run_distributed(rl_layout_step, 2, run, budget, True, references("dqo")), references("dqo"))


def test_pp2_with_virtual_stages(dataset):  # noqa: F811
    """PP2 x VPP2 (4 layers): every model chunk reads the same packed micro-batches."""
    import dataclasses

    run = _run("dqo", 4)
    run.model = dataclasses.replace(run.model, num_layers=4)
    padded = _micro_batches(dataset, "samples", packing=False, mbs=4, steps=2)
    (ref,) = run_distributed(rl_reference_step, 1, run, padded, True)
    packed = _micro_batches(dataset, "samples", packing=True, mbs=4, steps=2, fixed_rows=True)
    run.parallel = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    _assert_matches(run_distributed(rl_layout_step, 2, run, packed, True, ref), ref)
