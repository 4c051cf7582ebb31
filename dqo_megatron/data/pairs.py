"""DPO pairs: correct x incorrect responses of the same prompt, at most N per prompt (paper: 12)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dqo_megatron.data.batching import pad_collate


def is_positive(correct: np.ndarray, outcome_rewards: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Desirable responses: `correct == 1` where known (>= 0), else outcome reward >= threshold. [N] bool."""
    correct = np.asarray(correct)
    return np.where(correct >= 0, correct == 1, np.asarray(outcome_rewards) >= threshold)


def build_dpo_pairs(
    prompt_index: np.ndarray, positive: np.ndarray, max_pairs_per_prompt: int = 12, seed: int = 0
) -> np.ndarray:
    """All (chosen, rejected) document pairs of each prompt, subsampled to at most N per prompt.

    Args:
        prompt_index: [N] int, the prompt group of each document.
        positive: [N] bool, desirable (correct) or not.
        max_pairs_per_prompt: keep at most this many pairs per prompt (a uniform random subset drawn
          with a generator seeded by (seed, prompt), so it does not depend on other prompts).
        seed: base seed.
    Returns:
        int64 [num_pairs, 2] of (chosen, rejected) document indices, grouped by ascending prompt index,
        pairs of a prompt in (chosen, rejected) ascending order.
    """
    if max_pairs_per_prompt < 1:
        raise ValueError(f"max_pairs_per_prompt must be >= 1, got {max_pairs_per_prompt}")
    prompt_index = np.asarray(prompt_index, dtype=np.int64)
    positive = np.asarray(positive, dtype=bool)
    if prompt_index.shape != positive.shape:
        raise ValueError(f"prompt_index {prompt_index.shape} and positive {positive.shape} differ in shape")
    order = np.argsort(prompt_index, kind="stable")
    keys, starts = np.unique(prompt_index[order], return_index=True)
    ends = list(starts[1:]) + [len(order)]
    out = []
    for k, s, e in zip(keys, starts, ends):
        docs = order[s:e]
        good, bad = docs[positive[docs]], docs[~positive[docs]]
        if len(good) == 0 or len(bad) == 0:
            continue
        n = len(good) * len(bad)
        flat = np.arange(n)
        if n > max_pairs_per_prompt:
            flat = np.sort(np.random.default_rng([seed, int(k)]).choice(n, max_pairs_per_prompt, replace=False))
        out.append(np.stack([good[flat // len(bad)], bad[flat % len(bad)]], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)


class DPOPairDataset(torch.utils.data.Dataset):
    """Item j = (chosen sample, rejected sample) of pair j over a TrajectoryDataset."""

    def __init__(self, dataset, pairs: np.ndarray):
        self.dataset, self.pairs = dataset, np.asarray(pairs, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> tuple[dict[str, Any], dict[str, Any]]:
        c, r = self.pairs[j]
        return self.dataset[int(c)], self.dataset[int(r)]


def collate_pairs(items, pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Pad B pairs into one batch of 2B rows: rows [0, B) chosen, rows [B, 2B) rejected (see pad_collate)."""
    chosen = [c for c, _ in items]
    rejected = [r for _, r in items]
    return pad_collate(chosen + rejected, pad_id, pad_to_multiple_of)
