"""The identity of a model directory, cheap enough for a 70B checkpoint: what a rollout output records so
that a resume can tell "the same model" from "a model directory that changed since".

A path says nothing about what is in it: a directory overwritten by a newer fine-tune keeps its path,
its config and even its weight index (names, shapes and sizes do not change with training). So the
identity covers, per part:

* ``config``: the small files that describe the model (config.json, generation_config.json,
  checkpoint.json, model_config.yaml, ...), hashed whole;
* ``tokenizer``: the tokenizer files (data.tokenize.TOKENIZER_IDENTITY_FILES, any *.model), hashed whole;
* ``weights``: each weight file's relative path and size, plus a hash of SAMPLE_BLOCKS blocks of
  SAMPLE_BYTES spread evenly over its bytes (first and last included), and weight index files hashed
  whole. Training changes every tensor, so any fine-tune changes the sampled bytes, while a 140 GB
  checkpoint costs a few MB of reads instead of a full hash.

Documentation and hidden directories (.git, .cache) are left out: editing a README does not change
the identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dqo_megatron.data.tokenize import TOKENIZER_IDENTITY_FILES
from dqo_megatron.tokenizer_files import tokenizer_kind

SAMPLE_BLOCKS = 8
"""Blocks hashed per large file."""
SAMPLE_BYTES = 1 << 16
"""Bytes per block (64 KiB: 8 blocks = 512 KiB read per weight file)."""
WHOLE_LIMIT = 1 << 20
"""Files up to this size (1 MiB) are hashed whole."""
MAX_FILES = 100_000
"""A directory with more files than this is not a model (the walk stops with an error)."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".ckpt", ".gguf", ".h5", ".msgpack", ".npy")
_DOC_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf")
_DOC_PREFIXES = ("readme", "license", "notice", "use_policy")


def _part(rel: str, size: int) -> str | None:
    """Which part a file belongs to (None: left out)."""
    name = os.path.basename(rel)
    low = name.lower()
    if low.endswith(_DOC_SUFFIXES) or low.startswith(_DOC_PREFIXES):
        return None
    if name in TOKENIZER_IDENTITY_FILES or (low.endswith(".model") and size <= 64 * WHOLE_LIMIT):
        return "tokenizer"
    if (
        low.endswith(_WEIGHT_SUFFIXES)
        or low.endswith(".index.json")
        or name == ".metadata"
        or rel.split(os.sep)[0] == "weights"
    ):
        return "weights"
    return "config"


def _file_digest(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_LIMIT:
            h.update(f.read())
        else:
            last = size - SAMPLE_BYTES
            for k in range(SAMPLE_BLOCKS):
                f.seek(last * k // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _walk(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, name) for name in sorted(filenames))
        if len(out) > MAX_FILES:
            raise ValueError(f"{root} holds more than {MAX_FILES} files: not a model directory")
    return out


def model_identity(path: str | Path | None, tokenizer: str | Path | None = None) -> dict | None:
    """``{"config": sha256, "tokenizer": sha256, "weights": sha256, "files": n}`` of a model directory
    (or a single weight file), or None when `path` is not a local file or directory.

    Args:
        path: an HF model directory or a dqo-megatron checkpoint directory.
        tokenizer: a tokenizer given apart from the model (a directory or a .model file): then the
            tokenizer part is its files' hash instead of the model directory's tokenizer files.
    """
    if not path or not os.path.exists(path):
        return None
    root = os.path.abspath(path)
    files = [root] if os.path.isfile(root) else _walk(root)
    parts = {k: hashlib.sha256() for k in ("config", "tokenizer", "weights")}
    counted = 0
    for full in files:
        size = os.path.getsize(full)
        rel = os.path.relpath(full, root) if full != root else os.path.basename(full)
        part = _part(rel, size)
        if part is None or (tokenizer and part == "tokenizer"):
            continue
        parts[part].update(f"{rel}\0{size}\0{_file_digest(full, size)}\n".encode("utf-8", "surrogateescape"))
        counted += 1
    if tokenizer:
        from dqo_megatron.data.tokenize import tokenizer_fingerprint

        fp = tokenizer_fingerprint(str(tokenizer))
        parts["tokenizer"].update((fp or {}).get("sha256", "none").encode())
    source = str(tokenizer) if tokenizer else root
    if os.path.isdir(source) and tokenizer_kind(source) == "sentencepiece":
        # a lone tokenizer.model, read by transformers before 2026-12-06 and by sentencepiece since (other
        # prompt ids): completions cached under the old reading must not be taken for this one
        parts["tokenizer"].update(b"\0read with sentencepiece")
    return {**{k: h.hexdigest() for k, h in parts.items()}, "files": counted}


def identity_tag(model: str) -> str:
    """`model` (a path, or any name) with a hash of its `model_identity` appended when it is a local model,
    so that keys built from it (completion caches of eval and process-scores) change when the files at
    that path change: a model replaced in place is generated from again, never answered from the cache."""
    ident = model_identity(model)
    if ident is None:
        return model
    return f"{model}@{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]}"


def identity_difference(before: dict, now: dict) -> str:
    """What changed between two `model_identity` results, in words (for a refusal message)."""
    parts = ("weights", "config", "tokenizer")
    changed = [p for p in parts if before.get(p) != now.get(p)]
    same = [p for p in parts if p not in changed]
    if not changed:
        return "nothing"
    return f"its {', '.join(changed)} changed" + (f" ({', '.join(same)} the same)" if same else "")
