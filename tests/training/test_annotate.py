"""`annotate` writes the reference's log-probs: equal to transformers' on the same HF model, and the
same under TP=2 as under TP=1, and with packed rows (`train.packing`, also under CP=2)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dqo_megatron.config import DataConfig, InitConfig, ParallelConfig, RunConfig, TrainConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.hf_models import tiny_llama_checkpoint
from tests.helpers.synthetic_data import write_synthetic_dataset
from tests.training.test_trainer_init import SEQ


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate")
    _path, hf = tiny_llama_checkpoint(root, seq=SEQ, tied=True, seed=1)
    write_synthetic_dataset(str(root / "data" / "train"), docs=10, max_len=SEQ + 1)
    return root, hf


def _copy_dataset(root: Path, name: str) -> str:
    target = root / name
    shutil.copytree(root / "data", target)
    return str(target / "train")


def _annotate(run: RunConfig):
    from dqo_megatron.training.annotate import annotate

    return annotate(run, micro_batches_per_call=2, progress=False)


def _run(root: Path, prefix: str, parallel: dict) -> RunConfig:
    from dqo_megatron.conversion.megatron_io import read_metadata

    model, _ = read_metadata(root / "megatron")
    return RunConfig(
        model=model,
        parallel=ParallelConfig(**parallel),
        train=TrainConfig(micro_batch_size=2, global_batch_size=4, seq_length=SEQ),
        data=DataConfig(train_prefix=prefix),
        init=InitConfig(policy=str(root / "megatron")),
    )


def _read(prefix: str):
    from dqo_megatron.data.dataset import TrajectoryDataset

    ds = TrajectoryDataset(prefix)
    assert ds.manifest["ref_logprobs_filled"] is True
    return ds, [np.asarray(ds[i]["ref_logprobs"], dtype=np.float64) for i in range(len(ds))]


def test_annotate_matches_transformers_and_tp2(setup):
    root, hf = setup
    one = _copy_dataset(root, "tp1")
    two = _copy_dataset(root, "tp2")
    run_distributed(_annotate, 1, _run(root, one, {}))
    run_distributed(_annotate, 2, _run(root, two, dict(tensor_model_parallel_size=2)))
    ds, ref1 = _read(one)
    _, ref2 = _read(two)
    hf.eval()
    for i in range(len(ds)):
        tokens = torch.as_tensor(np.asarray(ds[i]["tokens"]), dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(hf(tokens).logits.double(), dim=-1)
        expected = np.zeros(tokens.shape[1])
        expected[1:] = logp[0, :-1].gather(-1, tokens[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(ref1[i], expected, atol=2e-5, err_msg=f"document {i}")
        np.testing.assert_allclose(ref2[i], ref1[i], atol=2e-6, err_msg=f"document {i} TP=2 vs TP=1")
        assert ref1[i][0] == 0.0 and np.all(ref1[i][1:] < 0)


def test_training_uses_annotated_reference(setup):
    root, _ = setup
    prefix = _copy_dataset(root, "train_from_data")
    run_distributed(_annotate, 1, _run(root, prefix, {}))

    def train_with(reference: str):
        run = _run(root, prefix, {})
        run.train.train_steps, run.data.reference = 2, reference
        return run

    from tests.training.test_trainer_init import _train

    (from_data,) = run_distributed(_train, 1, train_with("data"))
    (from_model,) = run_distributed(_train, 1, train_with("model"))
    assert from_data == pytest.approx(from_model, rel=1e-4)


def test_packed_annotate_writes_the_unpacked_log_probs(setup):
    root, _ = setup
    prefixes = {}  # documents of 10 to 20 tokens: most micro-batches of 2 pack into one row of 32
    for name in ("padded", "packed", "packed-cp2"):
        prefixes[name] = write_synthetic_dataset(str(root / f"packing-{name}" / "train"), docs=10, max_len=20)
    run_distributed(_annotate, 1, _run(root, prefixes["padded"], {}))
    packed = _run(root, prefixes["packed"], {})
    packed.train.packing = True
    run_distributed(_annotate, 1, packed)
    packed_cp = _run(root, prefixes["packed-cp2"], dict(context_parallel_size=2))
    packed_cp.train.packing = True
    run_distributed(_annotate, 2, packed_cp)
    ds, want = _read(prefixes["padded"])
    assert SEQ == 32 and sum(len(ds[i]["tokens"]) for i in (0, 1)) <= SEQ, "documents share a row"
    for name in ("packed", "packed-cp2"):
        _, got = _read(prefixes[name])
        for i in range(len(ds)):
            np.testing.assert_allclose(got[i], want[i], atol=2e-5, err_msg=f"{name}: document {i}")
