"""Completions on disk, keyed by everything that determines them, with seeds derived from the prefix.

Shared by process-scores (one entry per step prefix) and eval (one entry per problem): a rerun or an
interrupted run regenerates nothing it already has, and draws the same completions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Sequence

from dqo_megatron.rollout.backend import SamplingParams

log = logging.getLogger(__name__)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def prefix_seed(seed: int, prompt: Any, prefix: str) -> int:
    """Deterministic seed of one prefix's completions: from the base seed, the prompt and the prefix only
    (not from the batch or the file order, so reruns and resumed runs draw the same completions)."""
    h = hashlib.sha256(f"{seed}\0{_canonical(prompt)}\0{prefix}".encode("utf-8")).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def cache_key(prompt: Any, prefix: str, params: SamplingParams, seed: int, model: str, backend: str) -> str:
    """Cache key of one prefix's completions (sha256 of everything that determines them)."""
    blob = _canonical(
        {"prompt": prompt, "prefix": prefix, "params": asdict(params), "seed": seed, "model": model, "backend": backend}
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class CompletionCache:
    """Completions on disk: one JSON line {"key", "texts", "finish"?} per prompt (+ prefix), appended per batch.

    Used by process-scores (per prefix) and eval (per problem). A line cut by a kill (the last one) or
    otherwise unreadable is ignored (counted in `bad_lines`) and its completions are generated again.
    `path=None` keeps the cache in memory only.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.entries: dict[str, list[str]] = {}
        self.finish: dict[str, list[str]] = {}
        self.bad_lines = 0
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        obj = json.loads(raw)
                        texts = obj["texts"]
                        if not isinstance(obj["key"], str) or not all(isinstance(t, str) for t in texts):
                            raise TypeError
                    except (ValueError, KeyError, TypeError):
                        self.bad_lines += 1
                        continue
                    self.entries[obj["key"]] = texts
                    if isinstance(obj.get("finish"), list):
                        self.finish[obj["key"]] = obj["finish"]
            if self.bad_lines and not self.entries:
                # appending to it would damage a file that is not ours (records, a model's config, a tokenizer)
                raise ValueError(
                    f"{path}: not a completion cache (no line of it is a cache entry); give another "
                    "cache path, or remove the file"
                )
            if self.bad_lines:
                log.warning("%s: %d unreadable cache line(s) ignored (an interrupted write?)", path, self.bad_lines)

    def get(self, key: str) -> list[str] | None:
        """The cached completion texts of a prefix, or None."""
        return self.entries.get(key)

    def finish_reasons(self, key: str) -> list[str] | None:
        """The cached finish reasons ("eos", "length", "stop") of an entry, when they were stored."""
        return self.finish.get(key)

    def put_many(self, items: Sequence[tuple[str, list[str]]], finish: Sequence[list[str]] | None = None) -> None:
        """Add entries (and optionally their finish reasons, one list per entry) and append them to the file
        (flushed and fsynced: a kill loses at most this batch)."""
        lines = []
        for i, (key, texts) in enumerate(items):
            self.entries[key] = texts
            entry: dict[str, Any] = {"key": key, "texts": texts}
            if finish is not None:
                self.finish[key] = entry["finish"] = list(finish[i])
            lines.append(_canonical(entry) + "\n")
        if not self.path or not items:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # a previous run killed mid-line leaves no newline at the end: start on a fresh line
        needs_nl = os.path.exists(self.path) and os.path.getsize(self.path) > 0 and _last_byte(self.path) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_nl:
                f.write("\n")
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())


def _last_byte(path: str) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
