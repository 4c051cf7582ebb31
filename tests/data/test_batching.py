"""Sampler (disjoint, covering, deterministic, exactly resumable), padding and DPO pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqo_megatron.data.batching import DistributedTrajectorySampler, pad_collate
from dqo_megatron.data.pairs import DPOPairDataset, build_dpo_pairs, collate_pairs, is_positive


def _epoch(s):
    return [b for b in s]


@pytest.mark.parametrize("n,mbs,dp", [(96, 4, 4), (100, 3, 2), (7, 1, 7)])
def test_sampler_disjoint_and_covering(n, mbs, dp):
    per_rank = [_epoch(DistributedTrajectorySampler(n, mbs, r, dp, seed=5, drop_last=False)) for r in range(dp)]
    assert len({len(b) for b in per_rank}) == 1  # every rank makes the same number of steps
    steps = len(per_rank[0])
    seen = []
    for step in range(steps):  # within a global batch no index is on two ranks
        global_batch = [i for r in range(dp) for i in per_rank[r][step]]
        seen += global_batch
        if (step + 1) * mbs * dp <= n:
            assert len(set(global_batch)) == len(global_batch)
    assert set(seen) == set(range(n))
    if n % (mbs * dp) == 0:
        assert sorted(seen) == list(range(n))  # exactly once each
    dropped = [i for r in range(dp) for b in _epoch(DistributedTrajectorySampler(n, mbs, r, dp, seed=5)) for i in b]
    assert len(dropped) == len(set(dropped)) == (n // (mbs * dp)) * mbs * dp


def test_sampler_deterministic_and_epochs_differ():
    a, b = DistributedTrajectorySampler(50, 5, seed=1), DistributedTrajectorySampler(50, 5, seed=1)
    e0a, e0b = _epoch(a), _epoch(b)
    assert e0a == e0b
    assert _epoch(a) != e0a  # the next epoch is another permutation
    assert _epoch(DistributedTrajectorySampler(50, 5, seed=2)) != e0a
    assert _epoch(DistributedTrajectorySampler(10, 5, shuffle=False)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("stop_after", [0, 1, 7, 12])
def test_sampler_resume_matches_uninterrupted(stop_after):
    def make(rank):
        return DistributedTrajectorySampler(103, 4, rank, 2, seed=9, drop_last=True)

    for rank in range(2):
        ref = make(rank)
        uninterrupted = _epoch(ref) + _epoch(ref)  # two epochs
        s = make(rank)
        it = iter(s)
        first = [next(it) for _ in range(stop_after)]
        state = s.state_dict()
        resumed = make(rank)
        resumed.load_state_dict(dict(state))
        assert first + _epoch(resumed) + _epoch(resumed) == uninterrupted
    with pytest.raises(ValueError, match="seed"):
        DistributedTrajectorySampler(103, 4, 0, 2, seed=10).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        DistributedTrajectorySampler(103, 2, 0, 2, seed=9).load_state_dict(state)


def test_sampler_consumed_override_and_errors():
    s = DistributedTrajectorySampler(40, 2, seed=0)
    it = iter(s)
    batches = [next(it) for _ in range(5)]  # a prefetching loader ran ahead; training used 3
    r = DistributedTrajectorySampler(40, 2, seed=0)
    r.load_state_dict(s.state_dict(consumed_batches=3))
    assert next(iter(r)) == batches[3]
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedTrajectorySampler(10, 1, 2, 2)
    with pytest.raises(ValueError, match="drop_last"):
        DistributedTrajectorySampler(3, 2, 0, 2)


def _sample(T, P, k):
    return {
        "tokens": np.arange(T) + 10 * k,
        "loss_mask": np.arange(T) >= P,
        "rewards": np.where(np.arange(T) == T - 1, 1.0, 0.0).astype(np.float32),
        "behavior_logprobs": -np.ones(T, np.float32),
        "ref_logprobs": np.zeros(T, np.float32),
        "prompt_length": P,
        "prompt_index": k,
        "outcome_reward": 1.0,
        "correct": 1,
        "has_behavior_logprobs": True,
        "truncated": k == 1,
        "index": k,
    }


def test_pad_collate():
    batch = pad_collate([_sample(5, 2, 0), _sample(11, 3, 1)], pad_id=0, pad_to_multiple_of=8)
    assert batch["tokens"].shape == (2, 16)
    assert batch["tokens"][0, :5].tolist() == list(range(5)) and batch["tokens"][0, 5:].eq(0).all()
    assert batch["loss_mask"][0].tolist() == [False, False, True, True, True] + [False] * 11
    assert batch["attention_mask"].sum(1).tolist() == [5, 11]
    assert batch["rewards"][1, 10] == 1 and batch["rewards"].sum() == 2
    assert batch["behavior_logprobs"][0, 5:].eq(0).all()
    assert batch["prompt_length"].tolist() == [2, 3] and batch["index"].dtype == torch.long
    assert batch["truncated"].tolist() == [False, True] and batch["truncated"].dtype == torch.bool
    legacy = {k: v for k, v in _sample(5, 2, 1).items() if k != "truncated"}  # a dict built before the key existed
    assert pad_collate([legacy, _sample(4, 1, 1)], 0)["truncated"].tolist() == [False, True]
    with pytest.raises(KeyError):  # other per-document keys stay required
        pad_collate([{k: v for k, v in _sample(5, 2, 0).items() if k != "correct"}], 0)
    assert pad_collate([_sample(64, 2, 0)], 0, 64)["tokens"].shape == (1, 64)
    with pytest.raises(ValueError, match="max_length"):
        pad_collate([_sample(9, 2, 0)], 0, 8, max_length=8)


def test_dpo_pairs():
    prompt = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    correct = np.array([1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    pairs = build_dpo_pairs(prompt, correct.astype(bool))
    assert pairs[:2].tolist() == [[0, 1], [0, 2]]  # prompt 0: 1 x 2; prompt 1: no incorrect; prompt 3: no correct
    p2 = pairs[2:]
    assert len(p2) == 12 and len({tuple(p) for p in p2}) == 12  # 4 x 4 = 16 capped at 12, no duplicates
    assert all(correct[c] == 1 and correct[r] == 0 and prompt[c] == prompt[r] == 2 for c, r in p2)
    assert np.array_equal(build_dpo_pairs(prompt, correct.astype(bool)), pairs)  # deterministic
    assert len(build_dpo_pairs(prompt, correct.astype(bool), max_pairs_per_prompt=3)) == 2 + 3
    assert is_positive(np.array([-1, -1, 0, 1]), np.array([1.0, 0.0, 1.0, 0.0])).tolist() == [True, False, False, True]

    class Fake:
        def __getitem__(self, i):
            return _sample(3 + i, 1, i)

    batch = collate_pairs([DPOPairDataset(Fake(), pairs)[j] for j in range(2)], pad_id=0)
    assert batch["index"].tolist() == [0, 0, 1, 2]  # chosen rows first, then rejected
