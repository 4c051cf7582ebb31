"""Batches for training: padded to a multiple; the sampler. Packed micro-batches (`train.packing`) are
built from padded ones by `dqo_megatron.training.packing`.

Per-token keys (tokens, loss_mask, rewards, behavior_logprobs, ref_logprobs) are aligned with the
tokens; the trainer shifts them for next-token prediction. Per-document keys (PER_DOC) become ``[B]``
tensors, among them `truncated`: the response was cut by the sampler's length limit, so its last token
is not the end of an episode (the loss decides what to do with that).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

PER_TOKEN = {
    "tokens": torch.long,
    "loss_mask": torch.bool,
    "rewards": torch.float32,
    "behavior_logprobs": torch.float32,
    "ref_logprobs": torch.float32,
}
PER_DOC = {
    "prompt_length": torch.long,
    "prompt_index": torch.long,
    "outcome_reward": torch.float32,
    "correct": torch.long,
    "has_behavior_logprobs": torch.bool,
    "truncated": torch.bool,
    "index": torch.long,
}
PER_DOC_DEFAULTS = {"truncated": False}
"""Per-document keys a sample dict may lack (one built by hand before the key existed): their value then."""


def _per_doc(samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The PER_DOC keys of `samples` as ``[len(samples)]`` tensors (PER_DOC_DEFAULTS for a missing key)."""
    out = {}
    for key, dt in PER_DOC.items():
        values = (
            [s.get(key, PER_DOC_DEFAULTS[key]) for s in samples]
            if key in PER_DOC_DEFAULTS
            else [s[key] for s in samples]
        )
        out[key] = torch.tensor(values, dtype=dt)
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_collate(
    samples: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 8, max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad samples to one length, rounded up to a multiple of `pad_to_multiple_of`.

    Returns (B = len(samples), L = padded length):
        tokens [B, L] long (pad_id on padding), loss_mask [B, L] bool (False on padding), rewards,
        behavior_logprobs, ref_logprobs [B, L] float32 (0 on padding), attention_mask [B, L] bool
        (True on real tokens), position_ids [B, L] long, lengths [B] long, and the per-document
        keys of PER_DOC as [B] tensors (truncated [B] bool among them).
    """
    if not samples:
        raise ValueError("pad_collate got an empty batch")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    lengths = [len(s["tokens"]) for s in samples]
    L = _round_up(max(lengths), pad_to_multiple_of)
    if max_length is not None and L > max_length:
        if max(lengths) > max_length:
            raise ValueError(f"a sample has {max(lengths)} tokens > max_length {max_length}")
        L = max_length
    B = len(samples)
    out: dict[str, torch.Tensor] = {}
    for key, dt in PER_TOKEN.items():
        buf = torch.full((B, L), pad_id if key == "tokens" else 0, dtype=dt)
        for b, s in enumerate(samples):
            buf[b, : lengths[b]] = torch.as_tensor(np.asarray(s[key]))
        out[key] = buf
    lens = torch.tensor(lengths, dtype=torch.long)
    out["lengths"] = lens
    out["attention_mask"] = torch.arange(L)[None, :] < lens[:, None]
    out["position_ids"] = torch.arange(L).expand(B, L).clone()
    out.update(_per_doc(samples))
    return out


class DistributedTrajectorySampler:
    """Batches of document indices for one data-parallel rank; deterministic, disjoint, resumable.

    Each epoch permutes all indices with `seed + epoch` (or keeps them in order when shuffle is off),
    cuts the permutation into global batches of `micro_batch_size * dp_size` and gives rank r the r-th
    slice of each. A trailing partial global batch is dropped (drop_last) or completed with indices
    from the start of the same permutation (so every rank makes the same number of steps).
    Iterating yields the rest of the current epoch, then moves to the next epoch.

    Resume: `state_dict()` holds (epoch, batches yielded in this epoch); a new sampler after
    `load_state_dict(state)` yields exactly the batches the old one would have yielded next. With a
    prefetching DataLoader the sampler runs ahead of training: save
    `state_dict(consumed_batches=k)` with the number of batches the trainer really consumed.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        if num_samples < 1 or micro_batch_size < 1:
            raise ValueError(f"need num_samples >= 1 and micro_batch_size >= 1, got {num_samples}, {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, dp_size={dp_size})")
        self.n, self.mbs, self.rank, self.dp = num_samples, micro_batch_size, dp_rank, dp_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.global_batch = micro_batch_size * dp_size
        if drop_last and num_samples < self.global_batch:
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {self.global_batch} "
                f"(micro_batch_size {micro_batch_size} x dp_size {dp_size}); set drop_last=False"
            )
        self.epoch = 0
        self.position = 0

    def batches_per_epoch(self) -> int:
        """Number of batches each rank gets per epoch."""
        return self.n // self.global_batch if self.drop_last else -(-self.n // self.global_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.position

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order(self.epoch)
        nb = self.batches_per_epoch()
        if not self.drop_last and nb * self.global_batch > self.n:
            order = np.concatenate([order, np.resize(order, nb * self.global_batch - self.n)])
        while self.position < nb:
            start = self.position * self.global_batch + self.rank * self.mbs
            batch = order[start : start + self.mbs].tolist()
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch, self.position = int(epoch), 0

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, int]:
        """Position to resume from; `consumed_batches` overrides the count of batches done in this epoch."""
        pos = self.position if consumed_batches is None else int(consumed_batches)
        return {
            "epoch": self.epoch,
            "position": pos,
            "seed": self.seed,
            "num_samples": self.n,
            "global_batch": self.global_batch,
            "shuffle": int(self.shuffle),
            "drop_last": int(self.drop_last),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from a state_dict; raise ValueError if it was saved with different data or settings."""
        mine = self.state_dict()
        for k in ("seed", "num_samples", "global_batch", "shuffle", "drop_last"):
            if int(state[k]) != int(mine[k]):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler {mine[k]}: cannot resume exactly")
        if not 0 <= int(state["position"]) <= self.batches_per_epoch():
            raise ValueError(f"sampler state position {state['position']} outside [0, {self.batches_per_epoch()}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
