"""The trainer's micro-batches carry each row's `truncated` flag ([b] bool) next to the shifted token
tensors, in every batching mode (samples, DPO pairs, KTO with its mismatched rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqo_megatron.data.batching import pad_collate
from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.data.indexed import TrajectoryWriter
from dqo_megatron.data.tokenize import TokenizedSample
from dqo_megatron.training.microbatches import MicroBatches, mismatched_rows, to_model_batch

TRUNCATED = (1, 4, 6)
"""Documents written as truncated (cut by the sampler's length limit)."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> TrajectoryDataset:
    """8 documents, 2 prompts, correct on even documents, truncated on TRUNCATED."""
    prefix = str(tmp_path_factory.mktemp("mb") / "d")
    rng = np.random.default_rng(0)
    writer = TrajectoryWriter(prefix, 64)
    for d in range(8):
        length, prompt = 6 + d, 3
        rewards = np.zeros(length, np.float32)
        rewards[-1] = float(d % 2 == 0)
        writer.add(
            TokenizedSample(
                tokens=rng.integers(3, 64, length),
                prompt_length=prompt,
                rewards=rewards,
                behavior_logprobs=None,
                prompt_id=f"p{d // 4}",
                outcome_reward=float(rewards[-1]),
                correct=int(d % 2 == 0),
                truncated=d in TRUNCATED,
            ),
            0,
        )
    writer.finalize({})
    return TrajectoryDataset(prefix)


def _batches(ds, mode: str, mbs: int = 4) -> list[dict]:
    mb = MicroBatches(
        ds,
        seq_length=15,
        micro_batch_size=mbs,
        dp_rank=0,
        dp_size=1,
        seed=0,
        shuffle=False,
        pad_id=0,
        with_ref_logprobs=False,
        mode=mode,
    )
    return mb.next_step(2)


def test_to_model_batch_carries_truncated(dataset):
    collated = pad_collate([dataset[i] for i in range(4)], pad_id=0)
    batch = to_model_batch(collated, with_ref_logprobs=False)
    assert batch["truncated"].dtype == torch.bool and batch["truncated"].shape == (4,)
    assert batch["truncated"].tolist() == [False, True, False, False] == dataset.truncated[:4].tolist()
    assert batch["tokens"].shape == (4, collated["tokens"].shape[1] - 1)  # the token tensors are shifted, the flag not


def test_samples_mode(dataset):
    first, second = _batches(dataset, "samples")
    assert first["truncated"].tolist() == dataset.truncated[:4].tolist()
    assert second["truncated"].tolist() == dataset.truncated[4:].tolist() == [True, False, True, False]


def test_kto_mismatched_rows_take_the_flag_of_their_response(dataset):
    items = [dataset[i] for i in range(4)]
    rows = mismatched_rows(items)
    # row i = prompt of document i + response of document i+1: the flag describes the response
    assert (
        [r["truncated"] for r in rows]
        == [items[(i + 1) % 4]["truncated"] for i in range(4)]
        == [True, False, False, False]
    )
    (batch, _) = _batches(dataset, "kto")
    assert batch["truncated"].tolist() == [False, True, False, False] + [True, False, False, False]


def test_pairs_mode_carries_chosen_then_rejected(dataset):
    mb = MicroBatches(
        dataset,
        seq_length=15,
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seed=0,
        shuffle=False,
        pad_id=0,
        with_ref_logprobs=False,
        mode="pairs",
    )
    pairs = mb.source.pairs
    batch = mb.next_step(1)[0]
    chosen, rejected = pairs[:2, 0], pairs[:2, 1]
    assert dataset.truncated[rejected].any() and not dataset.truncated[rejected].all()  # the flag can be told apart
    assert batch["truncated"].tolist() == dataset.truncated[chosen].tolist() + dataset.truncated[rejected].tolist()
    assert batch["truncated"].shape == (4,) and batch["tokens"].shape[0] == 4


def test_a_kto_mismatched_row_longer_than_a_row_is_cut_and_marked():
    """A long prompt joined to another document's long response can exceed seq_length + 1 although both
    documents fit: the row is cut to that many tokens (its prompt whole) and marked truncated."""

    def sample(prompt: int, length: int, first: int) -> dict:
        return {
            "tokens": np.arange(first, first + length),
            "loss_mask": np.arange(length) >= prompt,
            "rewards": np.zeros(length, np.float32),
            "behavior_logprobs": np.zeros(length, np.float32),
            "ref_logprobs": np.zeros(length, np.float32),
            "prompt_length": prompt,
            "truncated": False,
        }

    long_prompt, long_response = sample(30, 33, 100), sample(2, 33, 200)
    cut, whole = mismatched_rows([long_prompt, long_response], max_tokens=33)
    assert len(cut["tokens"]) == 33 and cut["truncated"]
    assert cut["tokens"].tolist() == list(range(100, 130)) + [202, 203, 204]
    assert cut["loss_mask"].tolist() == [False] * 30 + [True] * 3
    assert whole["tokens"].tolist() == [200, 201, 130, 131, 132] and not whole["truncated"]
    (uncut, _) = mismatched_rows([long_prompt, long_response])
    assert len(uncut["tokens"]) == 61, "without max_tokens nothing is cut"
