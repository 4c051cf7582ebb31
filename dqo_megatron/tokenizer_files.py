"""Which files make a directory a tokenizer, and how a tokenizer path is read: one rule for preprocessing,
training, generation and the HF export (no torch, transformers or sentencepiece import).

A tokenizer path is read one of two ways (`tokenizer_kind`):

* ``"sentencepiece"``: a sentencepiece ``.model`` file, or a directory whose only tokenizer file is
  ``tokenizer.model`` (none of `HF_TOKENIZER_FILES`). Preprocessing and generation encode with
  sentencepiece itself (`data.tokenize.Tokenizer`); the HF export converts that model into an HF tokenizer
  that gives the same ids (`conversion.hf_tokenizer`).
* ``"hf"``: a directory holding one of `HF_TOKENIZER_FILES`, loaded by transformers' ``AutoTokenizer``
  and copied as it is by the export (with its ``tokenizer.model``, if any).

A directory with a lone ``tokenizer.model`` is sentencepiece, not HF: transformers would guess a
conversion of it whose ids are not sentencepiece's (stories260K's model, transformers 5.23: "Hello world"
gives ``[1, 440, 411, ...]`` through ``AutoTokenizer``, ``[1, 346, ...]`` through sentencepiece), while its
identity (`data.tokenize.tokenizer_fingerprint`) is the lone ``.model`` file's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

TokenizerKind = Literal["hf", "sentencepiece"]

SENTENCEPIECE_FILE = "tokenizer.model"
"""What HF directories (and our exports) call the sentencepiece model a tokenizer was built from."""

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
"""Files that make a directory an HF tokenizer (read by transformers, whatever else it holds)."""

TOKENIZER_FILES = HF_TOKENIZER_FILES + (SENTENCEPIECE_FILE,)
"""Files that make a directory hold a tokenizer (an HF model directory or a checkpoint's hf/ may hold only
config.json)."""

GENERATION_CONFIG = "generation_config.json"

TOKENIZER_IDENTITY_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""The files of a tokenizer directory that its identity hash covers (`data.tokenize.tokenizer_fingerprint`):
exactly the tokenizer files that conversion copies, so a source directory and its checkpoint's copy hash
the same."""

COPIED_FILES = TOKENIZER_IDENTITY_FILES + (GENERATION_CONFIG,)
"""Files copied verbatim between HF directories and conversion checkpoints' hf/ (tokenizer, generation)."""


def tokenizer_kind(path: str | os.PathLike) -> Optional[TokenizerKind]:
    """How the tokenizer at `path` is read: "sentencepiece" for a ``.model`` file or a directory whose only
    tokenizer file is tokenizer.model, "hf" for a directory holding one of `HF_TOKENIZER_FILES`, None for
    anything else (a missing path, another file, a directory without tokenizer files)."""
    path = Path(path)
    if path.is_file():
        return "sentencepiece" if path.suffix == ".model" else None
    if not path.is_dir():
        return None
    if any((path / name).is_file() for name in HF_TOKENIZER_FILES):
        return "hf"
    return "sentencepiece" if (path / SENTENCEPIECE_FILE).is_file() else None


def holds_tokenizer(path: str | os.PathLike) -> bool:
    """True when `path` is a sentencepiece .model file or a directory holding tokenizer files."""
    return tokenizer_kind(path) is not None


def sentencepiece_model_file(path: str | os.PathLike) -> Optional[Path]:
    """The sentencepiece model read for `path` (the file itself, or the directory's tokenizer.model) when
    `tokenizer_kind` says "sentencepiece"; None otherwise (an HF directory is read by transformers)."""
    if tokenizer_kind(path) != "sentencepiece":
        return None
    path = Path(path)
    return path if path.is_file() else path / SENTENCEPIECE_FILE
