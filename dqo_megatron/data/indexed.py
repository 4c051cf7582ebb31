"""Trajectories in Megatron's indexed format: several aligned .bin/.idx pairs under one prefix.

`megatron.core.datasets.indexed_dataset` stores one dtype per file, so each per-token quantity has its
own file; document i of every file belongs to the same record:

    <prefix>_tokens.{bin,idx}             uint16 (vocab <= 65535) or int32 token ids            [T_i]
    <prefix>_rewards.{bin,idx}            float32 outcome reward on the last token + process    [T_i]
    <prefix>_behavior_logprobs.{bin,idx}  float32 sampler log-probs, 0 on the prompt (if any)   [T_i]
    <prefix>_ref_logprobs.{bin,idx}       float32 zeros; filled in place by the trainer's annotate step
    <prefix>_meta.{bin,idx}               float64 per document, META_FIELDS                     [10]
    <prefix>.json                         manifest: fields, tokenizer, prompt ids, inputs, counts

The manifest is written last, so a prefix with a manifest is complete; `preprocess` builds all of them
in a hidden sibling directory and moves them into place at the end (`dqo_megatron.outputs`).

Versions. The manifest's `meta_fields` names the meta columns in order, and readers go by those names.
Version 2 added the `truncated` column (a response cut by the sampler's length limit, stored without
EOS); a version-1 dataset (9 columns, no `truncated`) still loads, with every document not truncated.
The version was raised so that code older than the column refuses a version-2 dataset instead of
reading its 10-wide rows as 9-wide ones.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from dqo_megatron.outputs import atomic_write_text

FORMAT_NAME = "dqo-trajectories"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Versions `load_manifest` accepts (1: before the `truncated` column)."""
TOKEN_FILES = ("tokens", "rewards", "behavior_logprobs", "ref_logprobs")
META_FIELDS_V1 = (
    "prompt_length",
    "response_length",
    "prompt_index",
    "outcome_reward",
    "correct",
    "has_behavior_logprobs",
    "truncated_prompt_tokens",
    "input_index",
    "line",
)
"""The meta columns of version 1 (also what a manifest without `meta_fields` means)."""
META_FIELDS = META_FIELDS_V1 + ("truncated",)
"""Per-document metadata columns of <prefix>_meta (float64; integers are exact below 2**53). `truncated`:
1 when the record was cut by the sampler's length limit (its tokens end without EOS), else 0."""


def part_prefix(prefix: str, part: str) -> str:
    """The Megatron path prefix (no .bin/.idx) of one part, e.g. `out/gsm8k_tokens`."""
    return f"{prefix}_{part}"


def manifest_path(prefix: str) -> str:
    """Path of the manifest JSON of a prefix."""
    return prefix + ".json"


def dataset_files(prefix: str) -> list[str]:
    """Every file a dataset at `prefix` may have, the manifest (the marker of a complete dataset) last."""
    parts = TOKEN_FILES + ("meta",)
    return [part_prefix(prefix, p) + ext for p in parts for ext in (".bin", ".idx")] + [manifest_path(prefix)]


def token_dtype(vocab_size: int):
    """uint16 when every id fits, else int32 (as Megatron's own preprocess does)."""
    return np.uint16 if vocab_size <= 65535 else np.int32


class TrajectoryWriter:
    """Streams TokenizedSamples into the aligned indexed files of `prefix`.

    Usage: `w = TrajectoryWriter(prefix, vocab_size)`, `w.add(sample, input_index)` per record in output
    order, `w.finalize(manifest_extra)`; `w.abort()` removes partial files.
    """

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self.vocab_size = vocab_size
        dtypes = {
            "tokens": token_dtype(vocab_size),
            "rewards": np.float32,
            "behavior_logprobs": np.float32,
            "ref_logprobs": np.float32,
            "meta": np.float64,
        }
        self.dtypes = dtypes
        self.builders = {
            k: IndexedDatasetBuilder(part_prefix(prefix, k) + ".bin", dtype=dt) for k, dt in dtypes.items()
        }
        self.prompt_index: dict[str, int] = {}
        self.n_docs = 0
        self.n_tokens = 0
        self.any_behavior = False
        self.n_truncated = 0

    def _add(self, part: str, arr: np.ndarray) -> None:
        # one item per document; add_document takes numpy directly (add_item would go through torch)
        self.builders[part].add_document(arr, [arr.size])

    def add(self, s, input_index: int) -> None:
        """Append one TokenizedSample (from dqo_megatron.data.tokenize); `input_index` names its input file."""
        T = len(s.tokens)
        if s.tokens.max(initial=0) >= self.vocab_size or s.tokens.min(initial=0) < 0:
            raise ValueError(f"{s.file}:{s.line}: token id out of range for vocab_size {self.vocab_size}")
        pidx = self.prompt_index.setdefault(s.prompt_id, len(self.prompt_index))
        has_blp = s.behavior_logprobs is not None
        self.any_behavior |= has_blp
        self._add("tokens", s.tokens.astype(self.dtypes["tokens"]))
        self._add("rewards", s.rewards.astype(np.float32))
        self._add("behavior_logprobs", s.behavior_logprobs if has_blp else np.zeros(T, np.float32))
        self._add("ref_logprobs", np.zeros(T, np.float32))
        meta = np.array(
            [
                s.prompt_length,
                T - s.prompt_length,
                pidx,
                s.outcome_reward,
                s.correct,
                int(has_blp),
                s.truncated_prompt_tokens,
                input_index,
                s.line,
                int(s.truncated),
            ],
            dtype=np.float64,
        )
        self._add("meta", meta)
        self.n_truncated += int(s.truncated)
        self.n_docs += 1
        self.n_tokens += T

    def add_many(self, samples: list, input_indices: list[int]) -> None:
        """`add(s, i)` for each pair, in order, with one write per file: the same bytes and index entries
        (one document of one sequence per sample) as the per-sample calls."""
        n = len(samples)
        if n == 0:
            return
        if n == 1:
            self.add(samples[0], input_indices[0])
            return
        lengths = [len(s.tokens) for s in samples]
        tokens = np.concatenate([s.tokens for s in samples])
        if tokens.size and (tokens.max() >= self.vocab_size or tokens.min() < 0):
            for s in samples:  # the first offending sample, as add() would report it
                if s.tokens.max(initial=0) >= self.vocab_size or s.tokens.min(initial=0) < 0:
                    raise ValueError(f"{s.file}:{s.line}: token id out of range for vocab_size {self.vocab_size}")
        pidx = [self.prompt_index.setdefault(s.prompt_id, len(self.prompt_index)) for s in samples]
        has = [s.behavior_logprobs is not None for s in samples]
        self.any_behavior |= any(has)
        total = len(tokens)
        self._add_many("tokens", tokens.astype(self.dtypes["tokens"]), lengths)
        self._add_many("rewards", np.concatenate([s.rewards for s in samples]).astype(np.float32, copy=False), lengths)
        blp = (
            np.concatenate(
                [s.behavior_logprobs if h else np.zeros(len(s.tokens), np.float32) for s, h in zip(samples, has)]
            ).astype(np.float32, copy=False)
            if any(has)
            else np.zeros(total, np.float32)
        )
        self._add_many("behavior_logprobs", blp, lengths)
        self._add_many("ref_logprobs", np.zeros(total, np.float32), lengths)
        meta = np.array(
            [
                [
                    s.prompt_length,
                    T - s.prompt_length,
                    p,
                    s.outcome_reward,
                    s.correct,
                    int(h),
                    s.truncated_prompt_tokens,
                    i,
                    s.line,
                    int(s.truncated),
                ]
                for s, T, p, h, i in zip(samples, lengths, pidx, has, input_indices)
            ],
            dtype=np.float64,
        )
        self._add_many("meta", meta, [len(META_FIELDS)] * n)
        self.n_truncated += sum(int(s.truncated) for s in samples)
        self.n_docs += n
        self.n_tokens += total

    def _add_many(self, part: str, arr: np.ndarray, lengths: list[int]) -> None:
        # what add_document(doc, [len(doc)]) does for each document, with one write for all of them
        b = self.builders[part]
        b.data_file.write(np.ascontiguousarray(arr, dtype=b.dtype).tobytes(order="C"))
        n0 = len(b.sequence_lengths)
        b.sequence_lengths.extend(lengths)
        b.document_indices.extend(range(n0 + 1, n0 + len(lengths) + 1))

    def finalize(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Close all files, drop the behavior file if no record had log-probs, write the manifest."""
        for part, b in self.builders.items():
            b.finalize(part_prefix(self.prefix, part) + ".idx")
        parts = ["tokens", "rewards", "ref_logprobs", "meta"]
        if self.any_behavior:
            parts.insert(2, "behavior_logprobs")
        else:
            for ext in (".bin", ".idx"):
                os.remove(part_prefix(self.prefix, "behavior_logprobs") + ext)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "parts": parts,
            "dtypes": {p: np.dtype(self.dtypes[p]).name for p in parts},
            "meta_fields": list(META_FIELDS),
            "num_documents": self.n_docs,
            "num_tokens": self.n_tokens,
            "vocab_size": self.vocab_size,
            "has_behavior_logprobs": self.any_behavior,
            "ref_logprobs_filled": False,
            "num_truncated": self.n_truncated,
            "prompt_ids": list(self.prompt_index),
            **extra,
        }
        write_manifest(self.prefix, manifest)
        return manifest

    def abort(self) -> None:
        """Close and delete whatever was written (after an error)."""
        for part, b in self.builders.items():
            try:
                b.data_file.close()
            except Exception:
                pass
            for ext in (".bin", ".idx"):
                try:
                    os.remove(part_prefix(self.prefix, part) + ext)
                except FileNotFoundError:
                    pass


def write_manifest(prefix: str, manifest: dict[str, Any]) -> None:
    """Write (replace) the manifest of a prefix in one rename."""
    atomic_write_text(manifest_path(prefix), json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def load_manifest(prefix: str) -> dict[str, Any]:
    """The manifest of a prefix (any of READABLE_VERSIONS); raise FileNotFoundError / ValueError with what is wrong."""
    path = manifest_path(prefix)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {prefix!r} is not a finished `dqo-megatron preprocess` output")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not a dataset manifest ({type(exc).__name__}: {exc}); preprocess it again") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: not a dataset manifest (a JSON {type(m).__name__}, not an object)")
    if m.get("format") != FORMAT_NAME or m.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: format {m.get('format')!r} v{m.get('version')} is not {FORMAT_NAME} "
            f"v{' or v'.join(map(str, READABLE_VERSIONS))}"
        )
    return m


def meta_fields(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The meta columns of a dataset, in order, from its manifest (version 1 without the list: META_FIELDS_V1)."""
    return tuple(manifest.get("meta_fields") or META_FIELDS_V1)


def reference_staging_path(prefix: str) -> str:
    """Where annotate writes reference log-probs before they replace <prefix>_ref_logprobs.bin."""
    part = part_prefix(prefix, "ref_logprobs") + ".bin"
    return os.path.join(os.path.dirname(part), "." + os.path.basename(part) + ".annotating")


def stage_reference_logprobs(prefix: str) -> None:
    """Copy <prefix>_ref_logprobs.bin to its staging path (one process, before any writer opens it).

    Annotating in place would leave a dataset already marked filled with a mix of two references when
    a rerun is killed; the copy is written instead and replaces the original only when complete."""
    shutil.copyfile(part_prefix(prefix, "ref_logprobs") + ".bin", reference_staging_path(prefix))


def open_reference_logprobs_for_update(prefix: str) -> tuple[np.memmap, np.ndarray, np.ndarray]:
    """Writable view of the staged reference log-prob slot (see `stage_reference_logprobs`).

    Returns:
        (values, starts, lengths): `values` a float32 memmap over the staged copy of
        <prefix>_ref_logprobs.bin; document i occupies values[starts[i] : starts[i] + lengths[i]]
        (aligned with its tokens). Call `mark_reference_logprobs_filled(prefix)` when every document of
        every writer is written.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    part = part_prefix(prefix, "ref_logprobs")
    ds = IndexedDataset(part, mmap=True)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    starts = np.asarray(ds.index.sequence_pointers, dtype=np.int64) // 4
    values = np.memmap(reference_staging_path(prefix), dtype=np.float32, mode="r+")
    return values, starts, lengths


def mark_reference_logprobs_filled(prefix: str) -> None:
    """Move the staged reference log-probs into place, then set `ref_logprobs_filled` in the manifest
    (atomically). A kill in between leaves complete new values under the old flag: never a mix."""
    staged = reference_staging_path(prefix)
    if os.path.exists(staged):
        with open(staged, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged, part_prefix(prefix, "ref_logprobs") + ".bin")
    m = load_manifest(prefix)
    m["ref_logprobs_filled"] = True
    write_manifest(prefix, m)
