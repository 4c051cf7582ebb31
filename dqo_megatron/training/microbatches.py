"""Micro-batches for the trainer from a preprocessed trajectory dataset.

The dataset stores per-token arrays aligned with the tokens (the reward of token t sits at t). The
model predicts token t+1 from position t, so the trainer shifts everything by one: position h holds
``labels[h] = tokens[h+1]`` and that label's response mask, reward, behavior and reference log-probs.
Rows are right-padded to `train.seq_length + 1` tokens (a fixed length: pipeline stages exchange
fixed-shape tensors). Per row the micro-batch also carries `truncated` ``[b]`` bool: the response was
cut by the sampler's length limit (no EOS), so its last response token is not terminal.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from dqo_megatron.data.batching import DistributedTrajectorySampler, pad_collate
from dqo_megatron.data.dataset import TrajectoryDataset
from dqo_megatron.training.packing import (
    budget_micro_batches,
    budget_unit_groups,
    first_fit_decreasing,
    pack_microbatch,
    split_micro_batches,
)


def to_model_batch(collated: dict, *, with_ref_logprobs: bool) -> dict:
    """Shift a `pad_collate` batch (``[b, s+1]``) into the trainer's ``[b, s]`` micro-batch.

    Keys: tokens, labels, position_ids, response_mask, rewards, behavior_logprobs (NaN where the
    document has none: the loss then uses the reference's), all ``[b, s]``; truncated ``[b]`` bool (the
    row's response hit the sampler's length limit: no EOS, its last token is not an end); outcome_reward
    ``[b]`` (the answer's reward, for metrics that tell correct from incorrect answers); input_tokens
    ``[b]`` (input positions the document fills, min(length, s): what padding and FLOPs are measured
    against); ref_logprobs ``[b, s]`` (only with `with_ref_logprobs`).
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
        "truncated": collated["truncated"].clone(),
        "outcome_reward": collated["outcome_reward"].clone(),
        "input_tokens": collated["lengths"].clamp(max=tokens.shape[1] - 1),
    }
    if with_ref_logprobs:
        batch["ref_logprobs"] = collated["ref_logprobs"][:, 1:].contiguous()
    return batch


def mismatched_rows(samples: list[dict], max_tokens: int | None = None) -> list[dict]:
    """KTO's KL reference point needs responses under the wrong prompt: row i = prompt of sample i +
    response of sample i+1 (mod n), with that response's mask (as in TRL), and its `truncated` flag (the
    flag describes the response). n >= 2. `max_tokens`: a longer row (a long prompt with a long response
    of another document) is cut to that many tokens, as TRL cuts to its max_length, and marked truncated;
    every document fits, so without the cut such a pair would stop the run at the step drawing it."""
    out = []
    for i, sample in enumerate(samples):
        other = samples[(i + 1) % len(samples)]
        p, q = sample["prompt_length"], other["prompt_length"]
        row = {
            key: np.concatenate([np.asarray(sample[key])[:p], np.asarray(other[key])[q:]])[:max_tokens]
            for key in ("tokens", "loss_mask", "rewards", "behavior_logprobs", "ref_logprobs")
        }
        row.update({k: sample[k] for k in sample if k not in row})
        row["prompt_length"] = p
        cut = max_tokens is not None and p + len(other["tokens"]) - q > max_tokens
        row["truncated"] = bool(other.get("truncated", False)) or cut
        out.append(row)
    return out


class MicroBatches:
    """Endless micro-batches of one data-parallel rank, resumable through the sampler's state.

    `mode`: "samples" (one row per document: DQO, DRO, SFT, RS), "pairs" (DPO: `micro_batch_size`
    (chosen, rejected) pairs of the same prompt, rows [0, B) chosen and [B, 2B) rejected), "kto"
    (B documents, then B mismatched prompt/response rows for the KL reference point; `desirable` [B]).
    `packing`: the same documents packed into rows (`training/packing.py`); `fixed_rows`: as many
    packed rows as documents (pipeline stages exchange fixed shapes); `budget_rows`: micro-batches of at
    most this many packed rows instead of `micro_batch_size` documents (pairs and KTO's draws of
    `micro_batch_size` documents kept whole), split further until their number is a multiple of
    `micro_batch_multiple` (PP under virtual pipeline stages: Megatron's interleaved schedule).
    """

    def __init__(
        self,
        dataset: TrajectoryDataset,
        *,
        seq_length: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        shuffle: bool,
        pad_id: int,
        with_ref_logprobs: bool,
        device=None,
        mode: str = "samples",
        max_pairs_per_prompt: int = 12,
        packing: bool = False,
        fixed_rows: bool = False,
        budget_rows: int | None = None,
        micro_batch_multiple: int = 1,
    ):
        from dqo_megatron.data.pairs import DPOPairDataset, build_dpo_pairs, is_positive

        self.mode = mode
        self.positive = is_positive(dataset.correct, dataset.outcome_rewards)
        self.source = dataset
        if mode == "pairs":
            pairs = build_dpo_pairs(dataset.prompt_index, self.positive, max_pairs_per_prompt, seed=seed)
            if len(pairs) == 0:
                raise ValueError(
                    f"{dataset.prefix}: no prompt has both a correct and an incorrect response: no DPO pairs"
                )
            self.source = DPOPairDataset(dataset, pairs)
        elif mode == "kto" and micro_batch_size < 2:
            raise ValueError("KTO needs train.micro_batch_size >= 2 (mismatched pairs are built inside a micro-batch)")
        too_long = int((dataset.lengths > seq_length + 1).sum())
        if too_long:
            raise ValueError(
                f"{dataset.prefix}: {too_long} documents are longer than train.seq_length + 1 = {seq_length + 1} "
                "tokens; raise train.seq_length or preprocess with a smaller max_length"
            )
        self.dataset = dataset
        self.packing, self.fixed_rows, self.budget_rows = packing, fixed_rows, budget_rows
        if budget_rows is not None and not packing:
            raise ValueError("micro-batches by tokens need packing")
        self.micro_batch_multiple = micro_batch_multiple
        self.length = seq_length + 1
        self.pad_id = pad_id
        self.with_ref_logprobs = with_ref_logprobs
        self.device = device
        self.sampler = DistributedTrajectorySampler(
            len(self.source), micro_batch_size, dp_rank, dp_size, seed=seed, shuffle=shuffle, drop_last=True
        )
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
        """The micro-batches of the next optimizer step for this rank: `num_microbatches` draws of
        `micro_batch_size` documents each; with `budget_rows`, the same documents re-cut into
        micro-batches of at most that many packed rows (their number varies)."""
        if self.budget_rows is not None:
            return self._budget_step(num_microbatches)
        out = []
        for _ in range(num_microbatches):
            items = [self.source[i] for i in self._indices()]
            extra = {}
            if self.mode == "pairs":
                samples = [c for c, _ in items] + [r for _, r in items]
            elif self.mode == "kto":
                samples = items + mismatched_rows(items, self.length)
                extra["desirable"] = torch.as_tensor(self.positive[[s["index"] for s in items]])
            else:
                samples = items
            collated = pad_collate(samples, self.pad_id, pad_to_multiple_of=self.length, max_length=self.length)
            batch = {**to_model_batch(collated, with_ref_logprobs=self.with_ref_logprobs), **extra}
            if self.packing:
                rows = len(samples) if self.fixed_rows else None
                batch = pack_microbatch(samples, batch, seq_length=self.length - 1, pad_id=self.pad_id, num_rows=rows)
            out.append({k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch)
        return out

    def _budget_step(self, num_microbatches: int) -> list[dict]:
        docs, units, desirable = self._step_units(
            [[self.source[i] for i in self._indices()] for _ in range(num_microbatches)]
        )
        s = self.length - 1
        lengths = [len(doc["tokens"]) for doc in docs]
        if self.mode == "samples":  # the whole step packed at once, its rows cut in order
            cuts = [
                (documents, [[documents[i] for i in row] for row in rows])
                for documents, rows in budget_micro_batches(lengths, s, self.budget_rows)
            ]
        else:  # DPO's pairs and KTO's KL groups whole; each group packed on its own
            unit = "pair" if self.mode == "pairs" else "KL group"
            groups = budget_unit_groups([[lengths[d] for d in a + b] for a, b in units], s, self.budget_rows, unit)
            cuts = []
            for group in groups:
                order = _unit_order(group, units)
                rows = first_fit_decreasing([min(lengths[d], s) for d in order], s)
                cuts.append((group, [[order[i] for i in row] for row in rows]))
        if len(cuts) % self.micro_batch_multiple:
            cuts = split_micro_batches(cuts, [a + b for a, b in units], self.micro_batch_multiple)
        out = []
        fixed = self.budget_rows if self.fixed_rows else None  # pipeline stages: every micro-batch that many rows
        for group, rows in cuts:
            order = _unit_order(group, units)
            where = {d: i for i, d in enumerate(order)}
            samples = [docs[d] for d in order]
            collated = pad_collate(samples, self.pad_id, pad_to_multiple_of=self.length, max_length=self.length)
            padded = to_model_batch(collated, with_ref_logprobs=self.with_ref_logprobs)
            if self.mode == "kto":  # each document keeps its padded micro-batch's reference point
                padded["desirable"] = torch.as_tensor([desirable[d] for u in group for d in units[u][0]])
                padded["kl_group"] = torch.as_tensor([u for u in group for _ in units[u][0]], dtype=torch.long)
            packed_rows = [[where[d] for d in row] for row in rows]
            batch = pack_microbatch(samples, padded, seq_length=s, pad_id=self.pad_id, rows=packed_rows, num_rows=fixed)
            out.append({k: v.to(self.device) for k, v in batch.items()} if self.device is not None else batch)
        return out

    def _step_units(self, draws: list[list]) -> tuple[list[dict], list[tuple[list, list]], dict]:
        """A step's draws as (documents, units, desirable by document id). A unit is ``(first, second)``
        document ids, laid out in a micro-batch as every unit's first part, then every unit's second:
        a document ``([d], [])``; a DPO pair ``([chosen], [rejected])``; a KTO draw (KL group) ``(its
        documents, their mismatched rows)``."""
        docs: list[dict] = []
        units: list[tuple[list, list]] = []
        desirable: dict[int, bool] = {}

        def add(samples: list[dict]) -> list[int]:
            docs.extend(samples)
            return list(range(len(docs) - len(samples), len(docs)))

        for items in draws:
            if self.mode == "pairs":
                units += [(add([chosen]), add([rejected])) for chosen, rejected in items]
            elif self.mode == "kto":
                first = add(items)
                desirable.update({d: bool(self.positive[docs[d]["index"]]) for d in first})
                units.append((first, add(mismatched_rows(items, self.length))))
            else:
                units += [(add([item]), []) for item in items]
        return docs, units, desirable

    def state_dict(self) -> dict:
        """Where the next step's data starts (epoch and batch position of the sampler)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken."""
        self.sampler.load_state_dict(state)
        self._iter = None


def _unit_order(group: list[int], units: list[tuple[list, list]]) -> list[int]:
    """Document ids of a micro-batch of `group` units: every unit's first part, then every second part
    (DPO: chosen rows then rejected; KTO: documents then mismatched rows, as the losses read them)."""
    return [d for u in group for d in units[u][0]] + [d for u in group for d in units[u][1]]
