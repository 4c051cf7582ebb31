"""Runs start from a converted checkpoint: HF model -> `convert` -> train under any layout, same losses."""

from __future__ import annotations

import pytest

from dqo_megatron.config import DataConfig, InitConfig, LossConfig, ParallelConfig, RunConfig, TrainConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_llama_checkpoint
from tests.helpers.synthetic_data import write_synthetic_dataset

SEQ = 32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _model = tiny_llama_checkpoint(tmp_path_factory.mktemp("init"), seq=SEQ, tied=False, seed=0)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data") / "train"), docs=16, max_len=SEQ + 1)


def _run(checkpoint: str, dataset: str, parallel: dict, **init) -> RunConfig:
    from dqo_megatron.conversion.megatron_io import read_metadata

    model, _ = read_metadata(checkpoint)
    return RunConfig(
        model=model,
        parallel=ParallelConfig(**parallel),
        algorithm="dqo",
        train=TrainConfig(micro_batch_size=1, global_batch_size=4, seq_length=SEQ, lr=1e-3, train_steps=2),
        loss=LossConfig(beta=0.5),
        data=DataConfig(train_prefix=dataset),
        init=InitConfig(policy=checkpoint, **init),
    )


def _train(run: RunConfig):
    from dqo_megatron.training.trainer import train

    return train(run).losses


@pytest.mark.parametrize(
    "parallel",
    [
        dict(pipeline_model_parallel_size=2),
        dict(tensor_model_parallel_size=2),
        dict(tensor_model_parallel_size=2, sequence_parallel=True),
        {},
    ],
    ids=["pp2", "tp2", "tp2-sp", "dp2"],
)
def test_layouts_from_one_checkpoint_agree(checkpoint, dataset, parallel):
    (single,) = run_distributed(_train, 1, _run(checkpoint, dataset, {}))
    for losses in run_distributed(_train, 2, _run(checkpoint, dataset, parallel)):
        assert losses == pytest.approx(single, rel=1e-5)


def test_initial_loss_is_the_checkpoints(checkpoint, dataset):
    """Step 1's loss depends on the loaded weights: a random init gives another number."""
    (loaded,) = run_distributed(_train, 1, _run(checkpoint, dataset, {}))
    random_run = _run(checkpoint, dataset, {})
    random_run.init = InitConfig()
    (random,) = run_distributed(_train, 1, random_run)
    assert loaded[0] != pytest.approx(random[0], rel=1e-3)


def test_mismatched_model_is_named(checkpoint, dataset):
    run = _run(checkpoint, dataset, {})
    run.model.num_layers = 4
    with pytest.raises(Exception, match="model.num_layers=4 .checkpoint: 2."):
        run_distributed(_train, 1, run)
