"""Packed micro-batches: a micro-batch's documents in as few rows as fit, for every algorithm.

Why: rows padded to the longest document waste most of a step on GSM8K/MATH, whose responses range
from tens to hundreds of tokens. A packed micro-batch holds the same documents, in the same order,
as the padded one (`MicroBatches` builds DPO's pairs and KTO's mismatched rows before packing, so
they stay in their micro-batch), and carries two layouts:

* the model's, packed, ``[R, s]`` (R rows, s = `train.seq_length`): tokens, labels, position_ids
  (restarting at 0 in every document) and `attention_document_ids` (the document of tokens[h], -1 on
  padding), from which the model's attention stops at document boundaries
  (`dqo_megatron.models.packed`);
* the loss's, one row per document, ``[N, s]``: every other key of the padded micro-batch
  (`to_model_batch`: response_mask, rewards, behavior/reference log-probs, per-row truncated,
  outcome_reward, and KTO's desirable), plus `unpack_index` ``[N, s]``: where position h of document
  n sits in the flattened ``[R * s]`` packed rows (-1 past the document's end).

The loss function (`training/algorithms.py`) moves the model's per-token outputs back into document
rows with `unpack_rows` and runs the algorithm's loss on exactly the tensors of the padded
micro-batch. So every loss (lambda-returns per document, DPO's pairs, KTO's reference point, the
per-row truncation flags) is the padded one by construction; only the model's forward is packed, and
the loss's extra cost is one gather of ``[N, s, 3]``.

Capacity: documents are packed by their input positions. A document of T tokens fills the T input
positions ``[a, a+T)`` of its row, so the value after its last token (the bootstrap of a truncated
response) is computed as in the padded row; a row's s positions hold documents whose lengths add up
to at most s, and a document of s + 1 tokens (the longest allowed) fills a row alone.

Micro-batches by tokens (`train.micro_batch_tokens`): `budget_micro_batches` packs a whole step's
documents at once and cuts the rows into micro-batches of a fixed number of rows; DPO's pairs and
KTO's KL groups (a padded micro-batch's documents with their mismatched rows, so each document keeps
its padded reference point) are kept whole by `budget_unit_groups`; under virtual pipeline stages
`split_micro_batches` makes the count a multiple of PP. Each micro-batch is then an ordinary packed
micro-batch of its documents (docs/packing.md).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

MODEL_KEYS = ("tokens", "labels", "position_ids")
"""Keys of a packed micro-batch laid out as packed rows (plus `attention_document_ids`)."""


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of total size <= `capacity` holding every item once: first-fit decreasing.

    Items in decreasing size (ties: lower index first), each into the first bin where it fits, else a
    new bin. Deterministic; at most 11/9 OPT + 6/9 bins. Returns the bins in order of creation, each
    the item indices in placement order. Raises ValueError for an item larger than `capacity`.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-int(sizes[i]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        size = int(sizes[i])
        if size > capacity or size < 0:
            raise ValueError(f"item {i} has size {size}, outside [0, capacity {capacity}]")
        for b, room in enumerate(free):
            if size <= room:
                bins[b].append(i)
                free[b] -= size
                break
        else:
            bins.append([i])
            free.append(capacity - size)
    return bins


def pack_microbatch(
    samples: Sequence[dict],
    padded: dict,
    *,
    seq_length: int,
    pad_id: int,
    num_rows: int | None = None,
    rows: list[list[int]] | None = None,
) -> dict:
    """The packed micro-batch of `samples` (dataset items, N = len(samples) documents, each at most
    ``seq_length + 1`` tokens) from their padded micro-batch `padded` (`to_model_batch`, ``[N, s]``):
    the keys described in the module docstring.

    `num_rows`: pad the packed layout with empty rows up to this count (pipeline stages exchange
    fixed shapes); None: as few rows as first-fit decreasing needs. `rows`: the rows to use instead
    (indices into `samples`, as `budget_micro_batches` gives them). Returns R = `num_rows` or that
    count packed rows.
    """
    s = seq_length
    lengths = [len(sample["tokens"]) for sample in samples]
    if max(lengths) > s + 1:
        raise ValueError(f"a document has {max(lengths)} tokens > seq_length + 1 = {s + 1}")
    if padded["tokens"].shape != (len(samples), s):
        raise ValueError(f"padded micro-batch of shape {tuple(padded['tokens'].shape)}, want {(len(samples), s)}")
    if rows is None:
        rows = first_fit_decreasing([min(n, s) for n in lengths], s)
    rows = [list(r) for r in rows]
    if sorted(d for row in rows for d in row) != list(range(len(samples))):
        raise ValueError("rows must hold every document of the micro-batch exactly once")
    if any(sum(min(lengths[d], s) for d in row) > s for row in rows):
        raise ValueError(f"a row holds more than seq_length={s} tokens")
    if num_rows is not None:
        if len(rows) > num_rows:
            raise ValueError(f"{len(rows)} packed rows do not fit in num_rows={num_rows}")
        rows += [[] for _ in range(num_rows - len(rows))]
    # s + 1 columns: a document of s + 1 tokens (alone in its row) keeps its last token as a label
    tokens, positions, documents, offsets = lay_out_rows([x["tokens"] for x in samples], rows, s + 1, pad_id)
    unpack_index = torch.full((len(samples), s), -1, dtype=torch.long)
    for d, (r, at) in offsets.items():
        inputs = min(lengths[d], s)  # a document of s + 1 tokens: its last token is a label only
        unpack_index[d, :inputs] = r * s + at + torch.arange(inputs)
    batch = {k: v for k, v in padded.items() if k not in MODEL_KEYS}
    batch.update(
        tokens=tokens[:, :-1].contiguous(),
        labels=tokens[:, 1:].contiguous(),
        position_ids=positions[:, :-1].contiguous(),
        attention_document_ids=documents[:, :-1].contiguous(),
        unpack_index=unpack_index,
    )
    return batch


def lay_out_rows(sequences: Sequence, rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple:
    """Token sequences placed back to back in rows of `width` columns.

    sequences: token ids, each ``[T_i]``; rows: the sequence indices of each row, in order (lengths
    adding up to at most `width`). Returns ``(tokens, position_ids, document_ids, offsets)``: three
    ``[R, width]`` int64 tensors (positions restart at 0 in every sequence, a token's document id is
    its sequence's index; pad_id / 0 / -1 where no sequence is) and ``{index: (row, start column)}``.
    """
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    documents = torch.full((len(rows), width), -1, dtype=torch.long)
    offsets: dict[int, tuple[int, int]] = {}
    for r, members in enumerate(rows):
        at = 0
        for d in members:
            n = len(sequences[d])
            tokens[r, at : at + n] = torch.as_tensor(np.asarray(sequences[d], dtype=np.int64))
            positions[r, at : at + n] = torch.arange(n)
            documents[r, at : at + n] = d
            offsets[d] = (r, at)
            at += n
    return tokens, positions, documents, offsets


def budget_micro_batches(lengths: Sequence[int], seq_length: int, rows_per_micro_batch: int) -> list[tuple]:
    """A step's documents cut into micro-batches of at most `rows_per_micro_batch` packed rows.

    lengths: tokens of each document (at most seq_length + 1). All documents are packed together
    (first-fit decreasing, which packs tighter than micro-batch by micro-batch) and the rows, in order
    of creation, are cut into consecutive groups. Returns one ``(documents, rows)`` per micro-batch:
    the documents (indices into `lengths`, row by row) and its rows as positions in that list.
    """
    rows = first_fit_decreasing([min(int(n), seq_length) for n in lengths], seq_length)
    out = []
    for start in range(0, len(rows), rows_per_micro_batch):
        group = rows[start : start + rows_per_micro_batch]
        documents = [d for row in group for d in row]
        where = {d: i for i, d in enumerate(documents)}
        out.append((documents, [[where[d] for d in row] for row in group]))
    return out


def budget_unit_groups(
    units: Sequence[Sequence[int]], seq_length: int, rows_per_micro_batch: int, unit: str = "pair"
) -> list[list[int]]:
    """Units grouped into micro-batches of at most `rows_per_micro_batch` packed rows.

    A unit is documents that share a micro-batch: DPO's (chosen, rejected) pair, KTO's KL group (a
    padded micro-batch's documents and their mismatched rows). units: the token counts of each unit's
    documents. Units in decreasing total length (ties: lower index first), each into the first group
    whose documents still pack (first-fit decreasing) into the budget, else a new group; a unit never
    leaves its documents. Returns each group's unit indices, increasing. ValueError (naming `unit`)
    for a unit that needs more rows than the budget.
    """

    def rows_needed(group: list[int]) -> int:
        return len(first_fit_decreasing([min(int(n), seq_length) for i in group for n in units[i]], seq_length))

    groups: list[list[int]] = []
    for i in sorted(range(len(units)), key=lambda i: (-sum(int(n) for n in units[i]), i)):
        for group in groups:
            if rows_needed(sorted(group + [i])) <= rows_per_micro_batch:
                group.append(i)
                break
        else:
            if rows_needed([i]) > rows_per_micro_batch:
                raise ValueError(
                    f"{unit} {i} needs more than {rows_per_micro_batch} rows: raise train.micro_batch_tokens"
                )
            groups.append([i])
    return [sorted(group) for group in groups]


def split_micro_batches(cuts: list[tuple], unit_documents: Sequence[Sequence[int]], multiple: int) -> list[tuple]:
    """Micro-batches split until their number is a multiple of `multiple`.

    Why: Megatron's interleaved (virtual) pipeline schedule runs the micro-batches in whole groups of
    PP; cut by tokens, a step's count is whatever the budget gives. cuts: one ``(units, rows)`` per
    micro-batch, the unit indices it holds in order and its packed rows (lists of document ids);
    unit_documents: the document ids of each unit. The micro-batch with the most units (ties: the
    first) is split into its first half of units and the rest, each keeping its documents' places in
    the original rows (rows left empty are dropped, so no half needs more rows than the whole), until
    the count is a multiple. ValueError when no micro-batch has two units left to split.
    """
    cuts = [(list(units), [list(row) for row in rows]) for units, rows in cuts]
    while len(cuts) % multiple:
        at = max(range(len(cuts)), key=lambda i: (len(cuts[i][0]), -i))
        units, rows = cuts[at]
        if len(units) < 2:
            raise ValueError(
                f"{len(cuts)} micro-batches of one unit each cannot be split into a multiple of {multiple}"
            )
        halves = []
        for part in (units[: (len(units) + 1) // 2], units[(len(units) + 1) // 2 :]):
            documents = {d for u in part for d in unit_documents[u]}
            kept = [[d for d in row if d in documents] for row in rows]
            halves.append((part, [row for row in kept if row]))
        cuts[at : at + 1] = halves
    return cuts


def unpack_rows(packed: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """Per-token outputs of packed rows moved into one row per document (differentiable).

    packed ``[R, s, k]`` (whole sequences, gathered over context parallelism), unpack_index ``[N, s]``
    -> ``[N, s, k]``, 0 where the index is -1 (past a document's end: the padding of a padded row,
    whose outputs every loss masks out).
    """
    flat = packed.reshape(-1, packed.shape[-1])
    valid = (unpack_index >= 0)[..., None]
    out = flat[unpack_index.clamp(min=0)]
    return torch.where(valid, out, torch.zeros_like(out))
