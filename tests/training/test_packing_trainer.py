"""The real train loop with `train.packing`: the same losses as unpacked, and an exact resume.

Packing is a function of each micro-batch's documents only, and the documents come from the
checkpointed sampler, so a resumed packed run must repeat the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json

import pytest

from dqo_megatron.config import DataConfig, LossConfig, ParallelConfig, RunConfig, TrainConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.synthetic_data import write_synthetic_dataset
from tests.training.test_packing import MODEL, SEQ


def _run(
    prefix: str,
    run_dir,
    *,
    packing: bool,
    steps: int,
    algorithm: str = "dqo",
    tokens=None,
    parallel=None,
    micro_batch_size: int = 4,
    model=MODEL,
) -> RunConfig:
    return RunConfig(
        model=model,
        parallel=parallel or ParallelConfig(),
        algorithm=algorithm,
        train=TrainConfig(
            micro_batch_size=micro_batch_size,
            global_batch_size=8,
            seq_length=SEQ,
            lr=3e-3,
            train_steps=steps,
            packing=packing,
            micro_batch_tokens=tokens,
        ),
        loss=LossConfig(beta=0.5),
        data=DataConfig(train_prefix=prefix),
        run_dir=str(run_dir) if run_dir is not None else None,
    )


def _train(run: RunConfig) -> list[float]:
    from dqo_megatron.training.trainer import train

    return list(train(run).losses)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    # 12 to 24 tokens: documents share rows of 32, and KTO's mismatched rows (a prompt with another
    # document's response) stay within seq_length + 1
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data") / "train"), docs=16, max_len=24)


@pytest.mark.parametrize("algorithm", ["dqo", "kto"])
def test_packed_run_has_the_unpacked_losses(dataset, algorithm):
    (padded,) = run_distributed(_train, 1, _run(dataset, None, packing=False, steps=3, algorithm=algorithm))
    (packed,) = run_distributed(_train, 1, _run(dataset, None, packing=True, steps=3, algorithm=algorithm))
    assert len(set(round(x, 6) for x in padded)) == 3, "the run trains"
    assert packed == pytest.approx(padded, rel=1e-4)


@pytest.mark.parametrize("algorithm", ["dqo", "dpo"])
def test_run_with_micro_batches_by_tokens_has_the_unpacked_losses(dataset, algorithm):
    (padded,) = run_distributed(_train, 1, _run(dataset, None, packing=False, steps=3, algorithm=algorithm))
    budget_run = _run(dataset, None, packing=True, steps=3, tokens=2 * SEQ, algorithm=algorithm)
    (budget,) = run_distributed(_train, 1, budget_run)
    assert budget == pytest.approx(padded, rel=1e-4)


def test_kto_run_with_micro_batches_by_tokens_has_the_unpacked_losses(dataset):
    """KTO's draws of 2 documents (its KL groups, with 2 mismatched rows each) kept whole, two to a
    micro-batch of up to 8 packed rows: each document keeps the reference point of its padded
    micro-batch."""
    kto = dict(steps=3, algorithm="kto", micro_batch_size=2)
    (padded,) = run_distributed(_train, 1, _run(dataset, None, packing=False, **kto))
    (budget,) = run_distributed(_train, 1, _run(dataset, None, packing=True, tokens=8 * SEQ, **kto))
    assert len(set(round(x, 6) for x in padded)) == 3, "the run trains"
    assert budget == pytest.approx(padded, rel=1e-4)


def test_vpp_run_with_micro_batches_by_tokens_has_the_unpacked_losses(dataset):
    """PP2 x VPP2: a step's 8 documents fit one micro-batch of 8 rows, which the trainer splits in two
    for Megatron's interleaved schedule; the losses are the padded run's."""
    import dataclasses

    vpp = dict(
        steps=2,
        parallel=ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
        model=dataclasses.replace(MODEL, num_layers=4),
    )
    padded = run_distributed(_train, 2, _run(dataset, None, packing=False, **vpp))
    budget = run_distributed(_train, 2, _run(dataset, None, packing=True, tokens=8 * SEQ, **vpp))
    for rank in range(2):
        assert budget[rank] == pytest.approx(padded[rank], rel=1e-4)


def test_pp2_run_with_micro_batches_by_tokens_has_the_unpacked_losses(dataset):
    """Both runs under PP2 (same initial weights): the trainer gives the schedule one-row micro-batches."""
    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    padded = run_distributed(_train, 2, _run(dataset, None, packing=False, steps=2, parallel=pp2))
    budget = run_distributed(_train, 2, _run(dataset, None, packing=True, steps=2, tokens=SEQ, parallel=pp2))
    for rank in range(2):
        assert budget[rank] == pytest.approx(padded[rank], rel=1e-4)


def test_packed_run_resumes_exactly(dataset, tmp_path):
    (straight,) = run_distributed(_train, 1, _run(dataset, tmp_path / "straight", packing=True, steps=4))
    run_distributed(_train, 1, _run(dataset, tmp_path / "resumed", packing=True, steps=2))
    run_distributed(_train, 1, _run(dataset, tmp_path / "resumed", packing=True, steps=4))
    losses, logged = {}, []
    for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines():
        item = json.loads(line)
        losses[item["step"]] = item["loss"]
        logged.append(item["step"])
    assert logged.count(1) == 1 and logged.count(3) == 1, f"the second run resumed after step 2: {logged}"
    assert [losses[s] for s in (1, 2, 3, 4)] == straight


def test_metrics_report_the_computed_rows_and_scale_the_flops(dataset, tmp_path):
    """metrics.jsonl: a padded run computes a row per document, a packed one (by tokens here: the step's
    8 documents of 12-24 tokens fill 7 rows of 32) fewer, with less padding; the logged TFLOP/s count
    the rows computed (the logger's scale is the step's rows_per_document); tokens/s counts document tokens."""
    from dqo_megatron.training.metrics_logger import _computed_row_share

    logged = {}
    for packing in (False, True):
        run = _run(dataset, tmp_path / str(packing), packing=packing, steps=2, tokens=8 * SEQ if packing else None)
        run_distributed(_train, 1, run)
        lines = (tmp_path / str(packing) / "metrics.jsonl").read_text().splitlines()
        logged[packing] = [json.loads(line) for line in lines]
    assert all(m["rows_per_document"] == 1.0 for m in logged[False])
    assert all(0 < m["rows_per_document"] < 1 for m in logged[True])
    assert all(p["padding_frac"] < q["padding_frac"] for p, q in zip(logged[True], logged[False]))
    assert _computed_row_share(logged[True][0]) == logged[True][0]["rows_per_document"]
    # throughput counts the documents' tokens: the same packed or not, and summed over DP ranks (a DP2
    # run's step holds the same 8 documents, 4 per rank)
    run_distributed(_train, 2, _run(dataset, tmp_path / "dp2", packing=False, steps=2))
    dp2 = [json.loads(line) for line in (tmp_path / "dp2" / "metrics.jsonl").read_text().splitlines()]
    tokens = [m["document_tokens"] for m in logged[False]]
    assert all(t > 8 * 12 for t in tokens), tokens  # 8 documents of 12 to 24 tokens
    assert tokens == [m["document_tokens"] for m in logged[True]] == [m["document_tokens"] for m in dp2]
    assert _computed_row_share({}) == 1.0 and _computed_row_share({"rows_per_document": float("nan")}) == 1.0
