"""Short DQO runs of the real train loop give the same losses under every layout as on one process.

TP and DP start from identical weights by construction (on CPU Megatron initializes each full weight
from the seed, then shards it); pipeline stages draw their layers' initial weights in another order,
so PP layouts start from the single-process run's step-0 checkpoint (see test_checkpoint_resume).
"""

from __future__ import annotations

import pytest

from dqo_megatron.config import DataConfig, LossConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.synthetic_data import write_synthetic_dataset

SEQ = 32
MODEL = ModelConfig(
    family="llama",
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    seq_length=SEQ,
)
LAYOUTS = {
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "tp2-sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True)),
    "dp2": (2, {}),
}


def _run(prefix: str, parallel: dict, algorithm: str = "dqo", steps: int = 3) -> RunConfig:
    return RunConfig(
        model=MODEL,
        parallel=ParallelConfig(**parallel),
        algorithm=algorithm,
        train=TrainConfig(
            micro_batch_size=1,
            global_batch_size=4,
            seq_length=SEQ,
            lr=3e-3,
            train_steps=steps,
            lr_warmup_steps=1,
            lr_decay_style="cosine",
        ),
        loss=LossConfig(beta=0.5),
        data=DataConfig(train_prefix=prefix),
    )


def _train(run: RunConfig):
    from dqo_megatron.training.trainer import train

    summary = train(run)
    return {"losses": summary.losses, "metrics": summary.metrics, "steps": summary.steps}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data") / "train"), docs=16, max_len=SEQ + 1)


@pytest.fixture(scope="module")
def single(dataset):
    (result,) = run_distributed(_train, 1, _run(dataset, {}))
    return result


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_short_run_matches_single_process(layout, dataset, single):
    world, parallel = LAYOUTS[layout]
    results = run_distributed(_train, world, _run(dataset, parallel))
    for rank, result in enumerate(results):
        assert result["steps"] == 3
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4), f"rank {rank}"
        for key in ("policy_loss", "value_loss", "value_mean"):
            if key in single["metrics"][-1]:
                assert result["metrics"][-1][key] == pytest.approx(single["metrics"][-1][key], rel=1e-3, abs=1e-6)


def test_losses_change_over_steps(single):
    assert len(set(round(x, 6) for x in single["losses"])) == 3  # the run actually trains


@pytest.mark.parametrize("algorithm", ["dro", "sft", "rs", "dpo", "kto"])
def test_baselines_run(algorithm, dataset):
    run = _run(dataset, {}, algorithm, steps=2)
    if algorithm == "kto":
        run.train.micro_batch_size, run.train.global_batch_size = 2, 4
    (result,) = run_distributed(_train, 1, run)
    assert result["steps"] == 2 and all(x == x for x in result["losses"])
    expected_metric = {"dro": "value_loss", "sft": "nll", "rs": "nll", "dpo": "reward_accuracy", "kto": "kl_reference"}
    assert expected_metric[algorithm] in result["metrics"][-1], sorted(result["metrics"][-1])


def test_dpo_layouts_agree(dataset):
    (single,) = run_distributed(_train, 1, _run(dataset, {}, "dpo", steps=2))
    for result in run_distributed(_train, 2, _run(dataset, dict(tensor_model_parallel_size=2), "dpo", steps=2)):
        assert result["losses"] == pytest.approx(single["losses"], rel=1e-4)


def test_reference_offload_and_wandb_and_distributed_optimizer_checks(dataset):
    import torch

    run = _run(dataset, {}, steps=2)
    run.data.reference, run.data.reference_offload = "model", True
    (offloaded,) = run_distributed(_train, 1, run)
    run.data.reference_offload = False
    (kept,) = run_distributed(_train, 1, run)
    assert offloaded["losses"] == kept["losses"]
    if not torch.cuda.is_available():
        bad = _run(dataset, {}, steps=1)
        bad.train.distributed_optimizer = True
        with pytest.raises(Exception, match="distributed_optimizer=true needs GPUs"):
            run_distributed(_train, 1, bad)
    try:
        import wandb  # noqa: F401
    except ImportError:
        bad = _run(dataset, {}, steps=1)
        bad.train.wandb_project = "x"
        bad.run_dir = None
        with pytest.raises(Exception, match="wandb is not installed"):
            run_distributed(_train, 1, bad)


def _train_expecting_stop(run):
    from dqo_megatron.training.trainer import train

    try:
        train(run)
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_nonfinite_steps_are_skipped_then_the_run_stops(dataset):
    run = _run(dataset, {}, steps=20)
    run.train.lr, run.train.lr_warmup_steps, run.train.max_consecutive_nonfinite = 1e30, 0, 3
    (message,) = run_distributed(_train_expecting_stop, 1, run)
    assert "stopped after 3 consecutive steps with a NaN/inf loss" in message


def _skip_keeps_weights():
    import torch

    from dqo_megatron import parallel
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
    from dqo_megatron.training.step import lm_loss_func, train_step

    parallel.initialize(ParallelConfig())
    (gpt,) = build_model_chunks(MODEL, ParallelConfig())
    ddp = wrap_with_ddp([gpt])
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=1e-2)
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}

    def nan_forward(data_iterator, model):
        from functools import partial

        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]) * float("nan")
        return out, partial(lm_loss_func, batch["loss_mask"])

    tokens = torch.randint(0, 256, (1, 9))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "loss_mask": torch.ones(1, 8),
        "position_ids": torch.arange(8)[None],
    }
    result = train_step(
        ddp, optimizer, iter([batch]), num_microbatches=1, seq_length=8, micro_batch_size=1, forward_step=nan_forward
    )
    unchanged = all(torch.equal(before[n], p) for n, p in gpt.named_parameters())
    return result.update_successful, unchanged


def test_a_nan_step_is_not_applied():
    (updated, unchanged) = run_distributed(_skip_keeps_weights, 1)[0]
    assert not updated and unchanged
