"""Micro-batches for the trainer from a preprocessed trajectory dataset.

The dataset stores per-token arrays aligned with the tokens (the reward of token t sits at t). The
model predicts token t+1 from position t, so the trainer shifts everything by one: position h holds
``labels[h] = tokens[h+1]`` and that label's response mask, reward, behavior and reference log-probs.
Rows are right-padded to `train.seq_length + 1` tokens (a fixed length: pipeline stages exchange
fixed-shape tensors).
"""

from __future__ import annotations

from typing import Iterator

import torch

from dqo_megatron.data.batching import DistributedTrajectorySampler, pad_collate
from dqo_megatron.data.dataset import TrajectoryDataset


def to_model_batch(collated: dict, *, with_ref_logprobs: bool) -> dict:
    """Shift a `pad_collate` batch (``[b, s+1]``) into the trainer's ``[b, s]`` micro-batch.

    Keys: tokens, labels, position_ids, response_mask, rewards, behavior_logprobs (NaN where the
    document has none: the loss then uses the reference's), ref_logprobs (only with
    `with_ref_logprobs`).
    """
    tokens = collated["tokens"]
    behavior = collated["behavior_logprobs"][:, 1:].clone()
    behavior[~collated["has_behavior_logprobs"]] = float("nan")
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": collated["position_ids"][:, :-1].contiguous(),
        "response_mask": collated["loss_mask"][:, 1:].float(),
        "rewards": collated["rewards"][:, 1:].contiguous(),
        "behavior_logprobs": behavior,
    }
    if with_ref_logprobs:
        batch["ref_logprobs"] = collated["ref_logprobs"][:, 1:].contiguous()
    return batch


class MicroBatches:
    """Endless micro-batches of one data-parallel rank, resumable through the sampler's state."""

    def __init__(self, dataset: TrajectoryDataset, *, seq_length: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool, pad_id: int, with_ref_logprobs: bool, device=None):  # fmt: skip
        too_long = int((dataset.lengths > seq_length + 1).sum())
        if too_long:
            raise ValueError(
                f"{dataset.prefix}: {too_long} documents are longer than train.seq_length + 1 = {seq_length + 1} "
                "tokens; raise train.seq_length or preprocess with a smaller max_length"
            )
        self.dataset = dataset
        self.length = seq_length + 1
        self.pad_id = pad_id
        self.with_ref_logprobs = with_ref_logprobs
        self.device = device
        self.sampler = DistributedTrajectorySampler(len(dataset), micro_batch_size, dp_rank, dp_size, seed=seed,
                                                    shuffle=shuffle, drop_last=True)  # fmt: skip
        self._iter: Iterator[list[int]] | None = None

    def _indices(self) -> list[int]:
        while True:
            if self._iter is None:
                self._iter = iter(self.sampler)
            try:
                return next(self._iter)
            except StopIteration:  # the sampler moved to the next epoch
                self._iter = None

    def next_step(self, num_microbatches: int) -> list[dict]:
        """The micro-batches of the next optimizer step for this rank."""
        out = []
        for _ in range(num_microbatches):
            samples = [self.dataset[i] for i in self._indices()]
            collated = pad_collate(samples, self.pad_id, pad_to_multiple_of=self.length, max_length=self.length)
            batch = to_model_batch(collated, with_ref_logprobs=self.with_ref_logprobs)
            out.append({k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch)
        return out

    def state_dict(self) -> dict:
        """Where the next step's data starts (epoch and batch position of the sampler)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken."""
        self.sampler.load_state_dict(state)
        self._iter = None
