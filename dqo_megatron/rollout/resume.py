"""Resuming an output: its settings sidecar (``<output>.meta.json``), the scan that cuts a torn last
problem, and the staged file an overwrite writes until it is complete."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.outputs import atomic_write_text
from dqo_megatron.rollout.backend import GenerationBackend
from dqo_megatron.rollout.config import RolloutConfig
from dqo_megatron.rollout.identity import identity_difference, model_identity
from dqo_megatron.rollout.records import RolloutSummary

# the logger of the module these functions were split from: log lines keep their name
logger = logging.getLogger("dqo_megatron.rollout.rollout")

META_VERSION = 1
"""Version of the ``<output>.meta.json`` layout."""


def scan_output(path: str | Path, problems: list) -> tuple[set[int], int]:
    """Complete problems of an existing output, after cutting an incomplete tail.

    The file is a sequence of groups (one problem's records, written at once). A last line without
    its newline, or a last group with fewer lines than its `group_size`, is a write that a kill
    interrupted: the file is truncated to the end of the last complete group (and fsynced).
    Returns ``(problem indices already complete, bytes cut)``; raises ValueError on anything else
    (a file this code did not write, or records of other problems).
    """
    path = Path(path)
    done: set[int] = set()
    good_end = 0
    cur, count, size = None, 0, 0
    with open(path, "rb") as f:
        offset = 0
        for lineno, line in enumerate(f, 1):
            end = offset + len(line)
            if not line.endswith(b"\n"):
                break  # torn last line
            try:
                rec = json.loads(line)
                meta = rec["metadata"]
                idx, gsize = int(meta["problem_index"]), int(meta["group_size"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a rollout record of this tool ({exc})") from None
            if cur is None:
                cur, count, size = idx, 0, gsize
            elif idx != cur or gsize != size:
                raise ValueError(f"{path}:{lineno}: problem {idx} begins before problem {cur} is complete")
            if not 0 <= idx < len(problems) or rec.get("prompt_id") != problems[idx].id:
                raise ValueError(
                    f"{path}:{lineno}: record of problem {idx} ({rec.get('prompt_id')!r}) does not "
                    "match the problem list (problems file changed?)"
                )
            count += 1
            if count == size:
                if idx in done:
                    raise ValueError(f"{path}:{lineno}: problem {idx} written twice")
                done.add(idx)
                good_end, cur = end, None
            offset = end
    total = path.stat().st_size
    if total > good_end:
        with open(path, "r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
        logger.warning(
            "%s: cut %d bytes of an incomplete last problem (a killed run); it is sampled again", path, total - good_end
        )
    return done, total - good_end


def _problems_digest(problems: list) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.id, p.task, p.prompt, p.reference], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def settings_of(
    cfg: RolloutConfig, problems: list, backend: GenerationBackend | None = None, prompt_format: str | None = None
) -> dict:
    """Everything that shapes the records (stored in the sidecar; a resume must match it). Without a
    backend: the part known before the model is loaded (checked first, so a mismatch fails fast)."""
    keys = (
        "task",
        "offset",
        "limit",
        "n",
        "temperature",
        "top_p",
        "top_k",
        "max_new_tokens",
        "stop",
        "seed",
        "system_prompt",
        "behavior_logprobs",
        "label",
        "chat_template",
        "use_chat_template",
        "eos_token",
        "dtype",
    )
    out = {k: getattr(cfg, k) for k in keys}
    out.update(problems=str(Path(cfg.problems).absolute()), problems_sha256=_problems_digest(problems))
    model = cfg.model or (getattr(backend, "model_path", None) if backend is not None else None)
    identity = model_identity(model, cfg.tokenizer) if model else None
    if identity is not None:  # known before the model is loaded: a changed model fails fast
        out["model_identity"] = identity
    if backend is not None:
        out.update(
            model=str(Path(cfg.model).absolute()) if cfg.model else getattr(backend, "model_path", None),
            backend=backend.name,
            behavior_tokenizer=backend.tokenizer_name,
            prompt_format=prompt_format,
        )
    return json.loads(json.dumps(out))  # the JSON round trip makes it comparable with the stored copy


_WARNED_NO_IDENTITY: set[str] = set()


def check_settings(cfg: RolloutConfig, settings: dict) -> None:
    """ConfigError when `cfg.output` exists (and not overwrite) without a sidecar, or with other `settings`
    (only the keys given are compared).

    The model is compared by identity (`identity.model_identity`: config, tokenizer, sampled weight
    bytes), so a model directory that changed under the same path is refused, and a model that only
    moved is accepted. A sidecar written before identities were recorded is resumed with a warning.
    """
    out, meta = Path(cfg.output), Path(cfg.output + ".meta.json")
    if cfg.overwrite or not (out.exists() or meta.exists()):
        return
    if not meta.exists():
        raise ConfigError(
            f"{out} exists without {meta.name}: not a rollout output this tool can resume; remove it or set overwrite"
        )
    try:
        stored = json.loads(meta.read_text(encoding="utf-8"))["settings"]
        if not isinstance(stored, dict):
            raise TypeError(f"settings is a {type(stored).__name__}")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{meta}: not a rollout settings file this tool wrote ({type(exc).__name__}: {exc}); "
            f"move {out} and {meta.name} away, or set overwrite to start over"
        ) from None
    settings = dict(settings)
    now_id, then_id = settings.pop("model_identity", None), stored.get("model_identity")
    if now_id is not None and then_id is None and str(out) not in _WARNED_NO_IDENTITY:
        _WARNED_NO_IDENTITY.add(str(out))
        logger.warning(
            "%s was begun before rollout recorded the model's identity: cannot check that %s is the "
            "model that wrote it (only its path is compared); resuming",
            out,
            cfg.model or "the model",
        )
    if now_id is not None and then_id is not None:
        if now_id != then_id:
            raise ConfigError(
                f"{out} was made by another model: {cfg.model or settings.get('model')}: "
                f"{identity_difference(then_id, now_id)} since the output was begun, and resuming "
                "would mix two policies in one file; resume with the model that wrote it, write to "
                "a new output (-o), or set overwrite (--overwrite) to start over"
            )
        settings.pop("model", None)  # the same model, perhaps moved: its path may differ
    diff = sorted(k for k in settings if stored.get(k) != settings[k])
    if diff:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {settings[k]!r} now" for k in diff)
        raise ConfigError(
            f"{out} was made with other settings ({shown}); resume with the same settings, "
            "write elsewhere, or set overwrite"
        )


def prepare_output(
    cfg: RolloutConfig, settings: dict, problems: list, summary: RolloutSummary
) -> tuple[set[int], Path]:
    """Problems already done and the file to append to: `cfg.output` (new or resumed) or, when
    overwriting an existing output, a hidden sibling that replaces it once complete."""
    out, meta = Path(cfg.output), Path(cfg.output + ".meta.json")
    if cfg.overwrite and (out.exists() or meta.exists()):
        # the old output stays as it was until the new one is complete (a kill loses nothing)
        out = out.parent / f".{out.name}.overwrite-partial"
        meta = Path(str(out) + ".meta.json")
        out.unlink(missing_ok=True)
        meta.unlink(missing_ok=True)
    elif out.exists() or meta.exists():
        check_settings(cfg, settings)
        if not out.exists():
            out.touch()
        done, summary.truncated_bytes = scan_output(out, problems)
        return done, out
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(meta, json.dumps({"version": META_VERSION, "settings": settings}, indent=1) + "\n")
    out.touch()
    return set(), out


def drop_if_empty(written: Path, output: str) -> None:
    """After a failed run: remove the records file it was writing (and its sidecar) when it holds no
    record, so a refused model or a crash before the first problem leaves no empty output behind; a
    staged overwrite is removed whatever it holds (the old output stays as it was)."""
    staged = written != Path(output)
    if written.exists() and (staged or written.stat().st_size == 0):
        written.unlink()
        Path(str(written) + ".meta.json").unlink(missing_ok=True)


def replace_output(staged: Path, output: str) -> None:
    """Move a completed overwrite (records + sidecar) over `output`. The old sidecar goes first: a kill
    in between leaves records without a sidecar, which a resume refuses, never new settings over old
    records."""
    meta = Path(output + ".meta.json")
    meta.unlink(missing_ok=True)
    os.replace(staged, output)
    os.replace(str(staged) + ".meta.json", meta)
