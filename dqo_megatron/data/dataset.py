"""Read a preprocessed trajectory dataset (see indexed.py) as a torch Dataset; memory-mapped, no loading.

The per-document metadata is read by column name from the manifest's `meta_fields`, so datasets written
before a column existed still load: a version-1 dataset has no `truncated` column and all its documents
read as not truncated (every record then ended with EOS).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from dqo_megatron.data.indexed import load_manifest, meta_fields, part_prefix

_INDEX_MAGIC = b"MMIDIDX\x00\x00"
"""The first bytes of a Megatron .idx file (megatron.core.datasets.indexed_dataset)."""


def open_part(prefix: str, part: str, manifest: dict):
    """Megatron's memory-mapped `IndexedDataset` of one part, after checking what its reader would
    otherwise fail on with an assertion naming no file: both files exist, the index has Megatron's header,
    and the data file holds exactly the bytes the index points to. ValueError naming the file."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    base = part_prefix(prefix, part)
    idx, binary = base + ".idx", base + ".bin"
    for path in (idx, binary):
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the dataset {prefix} is incomplete (preprocess it again)")
    with open(idx, "rb") as f:
        if f.read(len(_INDEX_MAGIC)) != _INDEX_MAGIC:
            raise ValueError(f"{idx}: not a Megatron index file (damaged? preprocess the dataset again)")
    try:
        ds = IndexedDataset(base, mmap=True)
    except (AssertionError, ValueError, OSError, IndexError) as exc:
        raise ValueError(f"{idx}: damaged index ({type(exc).__name__}: {exc}); preprocess the dataset again") from None
    itemsize = np.dtype(manifest.get("dtypes", {}).get(part, ds.index.dtype)).itemsize
    n = len(ds.sequence_lengths)
    expected = int(ds.index.sequence_pointers[-1]) + int(ds.sequence_lengths[-1]) * itemsize if n else 0
    if os.path.getsize(binary) != expected:
        raise ValueError(
            f"{binary}: {os.path.getsize(binary)} bytes, its index points to {expected} (truncated or "
            "damaged; preprocess the dataset again)"
        )
    return ds


class TrajectoryDataset(torch.utils.data.Dataset):
    """Documents of `<prefix>_*` as dicts of numpy arrays.

    Item i is a dict:
        tokens            int64   [T]  (ends with EOS unless truncated)
        loss_mask         bool    [T]  True on response tokens (tokens[prompt_length:], EOS included when present)
        rewards           float32 [T]
        behavior_logprobs float32 [T]  (zeros and has_behavior_logprobs=False when the record had none)
        ref_logprobs      float32 [T]  (zeros until the annotate step fills them; see ref_logprobs_filled)
        prompt_length, prompt_index (int), prompt_id (str), outcome_reward (float), correct (int, -1 unknown),
        has_behavior_logprobs (bool), truncated (bool: the response was cut by the sampler's length limit
        and has no EOS; its last token is not an end), index (int, = i)

    Per-document arrays ``[N]``: prompt_lengths, lengths, prompt_index, outcome_rewards, correct,
    has_behavior, truncated (bool).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.manifest = load_manifest(prefix)
        self.parts = {p: open_part(prefix, p, self.manifest) for p in self.manifest["parts"] if p != "meta"}
        meta_ds = open_part(prefix, "meta", self.manifest)
        n = self.manifest["num_documents"]
        # the columns of `meta`, in order, as the manifest names them (a version-1 dataset has no "truncated")
        self.meta_fields = fields = meta_fields(self.manifest)
        widths = np.asarray(meta_ds.sequence_lengths, dtype=np.int64)
        if len(widths) != n or (n and not (widths == len(fields)).all()):
            raise ValueError(
                f"{part_prefix(prefix, 'meta')}: {len(widths)} rows of widths {sorted(set(widths.tolist()))}, "
                f"the manifest says {n} rows of {len(fields)} fields {list(fields)}"
            )
        # the meta part is n fixed-width rows; read it as one [n, F] block
        flat = meta_ds.get(0, 0, len(fields) * n) if n else np.zeros(0)
        # copy: the view would dangle once meta_ds (and its mmap) is garbage-collected
        self.meta = np.array(flat, dtype=np.float64, copy=True).reshape(n, len(fields))
        for p, ds in self.parts.items():
            if len(ds) != n:
                raise ValueError(f"{part_prefix(prefix, p)} has {len(ds)} documents, the manifest says {n}")
        col = {f: i for i, f in enumerate(fields)}
        self.prompt_lengths = self.meta[:, col["prompt_length"]].astype(np.int64)
        self.lengths = np.asarray(self.parts["tokens"].sequence_lengths, dtype=np.int64)
        self.prompt_index = self.meta[:, col["prompt_index"]].astype(np.int64)
        self.outcome_rewards = self.meta[:, col["outcome_reward"]]
        self.correct = self.meta[:, col["correct"]].astype(np.int64)
        self.has_behavior = self.meta[:, col["has_behavior_logprobs"]].astype(bool)
        # absent before format version 2: every document then ended with EOS
        self.truncated = self.meta[:, col["truncated"]].astype(bool) if "truncated" in col else np.zeros(n, dtype=bool)
        self.prompt_ids: list[str] = self.manifest["prompt_ids"]
        if not np.array_equal(
            self.prompt_lengths + self.meta[:, col["response_length"]].astype(np.int64), self.lengths
        ):
            raise ValueError(f"{prefix}: meta lengths disagree with the token file (mixed outputs under one prefix?)")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        T, P = int(self.lengths[i]), int(self.prompt_lengths[i])
        mask = np.zeros(T, dtype=bool)
        mask[P:] = True
        blp = self.parts.get("behavior_logprobs")
        return {
            "tokens": self.parts["tokens"][i].astype(np.int64),
            "loss_mask": mask,
            "rewards": np.array(self.parts["rewards"][i], dtype=np.float32),
            "behavior_logprobs": np.array(blp[i], dtype=np.float32) if blp is not None else np.zeros(T, np.float32),
            "ref_logprobs": np.array(self.parts["ref_logprobs"][i], dtype=np.float32),
            "prompt_length": P,
            "prompt_index": int(self.prompt_index[i]),
            "prompt_id": self.prompt_ids[int(self.prompt_index[i])],
            "outcome_reward": float(self.outcome_rewards[i]),
            "correct": int(self.correct[i]),
            "has_behavior_logprobs": bool(self.has_behavior[i]),
            "truncated": bool(self.truncated[i]),
            "index": i,
        }

    def source_of(self, i: int) -> str:
        """Where document i came from, "file:line" (the input's basename, as the manifest keeps it)."""
        col = {f: k for k, f in enumerate(self.meta_fields)}
        inputs = self.manifest.get("inputs") or []
        k, line = int(self.meta[i, col["input_index"]]), int(self.meta[i, col["line"]])
        return f"{inputs[k] if 0 <= k < len(inputs) else f'input {k}'}:{line}"

    def first_token_outside(self, vocab_size: int, chunk: int = 1 << 26) -> tuple[int, int] | None:
        """(document, token id) of the first stored token id outside [0, vocab_size), or None.

        Reads the token file once, in chunks (a plain scan: about a second per GB); ids outside the
        model's vocabulary would fail in its embedding (IndexError on CPU, a device assert on GPU)."""
        dtype = np.dtype(self.manifest.get("dtypes", {}).get("tokens", "int32"))
        path = part_prefix(self.prefix, "tokens") + ".bin"
        if os.path.getsize(path) == 0:  # numpy cannot map an empty file
            return None
        flat = np.memmap(path, dtype=dtype, mode="r")
        for a in range(0, len(flat), chunk):
            block = flat[a : a + chunk]
            if block.size and (int(block.max()) >= vocab_size or int(block.min()) < 0):
                pos = a + int(np.flatnonzero((block >= vocab_size) | (block < 0))[0])
                starts = np.asarray(self.parts["tokens"].index.sequence_pointers, dtype=np.int64) // dtype.itemsize
                doc = int(np.searchsorted(starts, pos, side="right") - 1)
                return doc, int(flat[pos])
        return None

    def first_nonfinite(self, part: str, chunk: int = 1 << 26) -> int | None:
        """The first document whose float32 `part` (rewards, behavior_logprobs, ref_logprobs) holds NaN or
        inf, or None. preprocess never writes one; a damaged or edited file can (one scan, like the ids)."""
        path = part_prefix(self.prefix, part) + ".bin"
        if part not in self.parts or os.path.getsize(path) == 0:
            return None
        flat = np.memmap(path, dtype=np.float32, mode="r")
        for a in range(0, len(flat), chunk):
            block = flat[a : a + chunk]
            if not np.isfinite(block).all():
                pos = a + int(np.flatnonzero(~np.isfinite(block))[0])
                starts = np.asarray(self.parts[part].index.sequence_pointers, dtype=np.int64) // 4
                return int(np.searchsorted(starts, pos, side="right") - 1)
        return None

    def groups(self) -> dict[int, np.ndarray]:
        """prompt_index -> sorted document indices of all samples of that prompt."""
        order = np.argsort(self.prompt_index, kind="stable")
        keys, starts = np.unique(self.prompt_index[order], return_index=True)
        return {int(k): order[s:e] for k, s, e in zip(keys, starts, list(starts[1:]) + [len(order)])}
