"""Does a preprocessed dataset belong to the model about to read it? Checked when the trainer and
`annotate` open their dataset, before any model is built.

Token ids are only numbers: data tokenized by another tokenizer with the same vocabulary size trains
without an error on text the model never sees, and ids beyond the model's vocabulary fail deep in the
embedding (an IndexError on CPU, a device assert on GPU). The dataset's manifest names its tokenizer
(name, a hash of its files, its vocabulary size); the model's tokenizer is what its init checkpoints
carry in hf/ (`convert hf-to-megatron` copies it there) and eval.tokenizer. See docs/data.md.
"""

from __future__ import annotations

import logging
import os

from dqo_megatron.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)


def model_tokenizers(run: RunConfig) -> list[tuple[str, str]]:
    """(setting, path) of every tokenizer the run's models come with: eval.tokenizer and the hf/ directory
    of init.policy / init.reference / init.value (those that exist), without repeats."""
    from dqo_megatron.conversion.megatron_io import HF_DIR

    found, seen = [], set()
    candidates = [("eval.tokenizer", run.eval.tokenizer)]
    candidates += [
        (f"init.{m}", os.path.join(getattr(run.init, m), HF_DIR) if getattr(run.init, m) else None)
        for m in ("policy", "reference", "value")
    ]
    for setting, path in candidates:
        if path and os.path.exists(path) and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append((setting, path))
    return found


def _dataset_tokenizer(manifest: dict) -> dict:
    tok = manifest.get("tokenizer")
    return tok if isinstance(tok, dict) else {"name": tok}  # very early or hand-written manifests: a name


def check_data_matches_model(dataset, run: RunConfig, log: bool = True) -> list[str]:
    """Refuse a dataset that does not belong to the run's model; return the warnings (logged when `log`).

    Args:
        dataset: a `TrajectoryDataset`.
        run: the run config (model.vocab_size, data.pad_id, data.allow_tokenizer_mismatch, init, eval).
        log: log the warnings (rank 0 only, to say them once).
    Raises:
        ConfigError naming both sides (paths, numbers, the files that differ) when a token id is outside
        the model's vocabulary (always), or, unless data.allow_tokenizer_mismatch, when the dataset's
        vocabulary is larger than the model's or its tokenizer hash differs from the model's.
    """
    manifest_path = dataset.prefix + ".json"
    vocab = run.model.vocab_size
    allow = run.data.allow_tokenizer_mismatch
    tok = _dataset_tokenizer(dataset.manifest)
    warnings: list[str] = []
    if not 0 <= run.data.pad_id < vocab:
        raise ConfigError(
            f"data.pad_id={run.data.pad_id} is not a token id of the model (model.vocab_size={vocab}): "
            "padding goes through the embedding too; use an id below the vocabulary size"
        )
    data_vocab = dataset.manifest.get("vocab_size")
    if isinstance(data_vocab, int) and data_vocab > vocab:
        msg = (
            f"{manifest_path}: the dataset's tokenizer {tok.get('name')!r} has {data_vocab} tokens, the model "
            f"{vocab} (model.vocab_size{_ckpt_note(run)}): ids the model does not have may be in the data"
        )
        if not allow:
            raise ConfigError(
                msg + "; preprocess with the model's tokenizer (or set data.allow_tokenizer_mismatch="
                "true if you know the extra ids are never used)"
            )
        warnings.append(msg + " (allowed by data.allow_tokenizer_mismatch; every id is checked below)")
    bad = dataset.first_token_outside(vocab)
    if bad is not None:
        doc, token = bad
        raise ConfigError(
            f"{dataset.prefix}: document {doc} (from {dataset.source_of(doc)}) holds token id {token}, "
            f"outside the model's vocabulary (model.vocab_size={vocab}{_ckpt_note(run)}): the data "
            "was tokenized for another model; preprocess it with this model's tokenizer"
        )
    for part in ("rewards", "behavior_logprobs", "ref_logprobs"):
        doc = dataset.first_nonfinite(part)
        if doc is not None:
            raise ConfigError(
                f"{dataset.prefix}_{part}.bin: document {doc} (from {dataset.source_of(doc)}) holds NaN "
                "or inf, which preprocess never writes: the file is damaged or was edited; preprocess "
                "(and annotate) the dataset again"
            )
    warnings += _compare_tokenizers(manifest_path, tok, run, allow)
    if log:
        for w in warnings:
            logger.warning("%s", w)
    return warnings


def _ckpt_note(run: RunConfig) -> str:
    return f", init.policy={run.init.policy}" if run.init.policy else ""


def _compare_tokenizers(manifest_path: str, tok: dict, run: RunConfig, allow: bool) -> list[str]:
    from dqo_megatron.data.tokenize import tokenizer_difference, tokenizer_fingerprint

    # an hf/ directory may hold only config.json: a tokenizer is what has tokenizer files
    theirs = [
        (setting, path, fp)
        for setting, path in model_tokenizers(run)
        if (fp := tokenizer_fingerprint(path)) is not None
    ]
    if not theirs:  # a warning: the check the user may count on could not be made
        return [
            f"{manifest_path}: the model comes with no tokenizer (no tokenizer files in an init checkpoint's hf/, "
            "no eval.tokenizer), so the data's tokenizer cannot be compared with it: only the vocabulary size and "
            "the token ids are checked"
        ]
    if not tok.get("sha256"):
        return [
            f"{manifest_path} records no tokenizer hash (written before preprocess recorded one, or by hand): "
            f"cannot check that its tokenizer {tok.get('name')!r} is the model's ({theirs[0][1]}); preprocess "
            "again to have it checked"
        ]
    out = []
    for setting, path, fp in theirs:
        diff = tokenizer_difference(tok, fp, ("the data's", "the model's"))
        if diff is None:
            diff = _read_differently(tok, path)
        if diff is None:
            continue
        msg = (
            f"{manifest_path}: the data was tokenized by {tok.get('name')!r} (sha256 {tok['sha256'][:12]}), "
            f"the model's tokenizer ({setting}: {path}) is another (sha256 {fp['sha256'][:12]}: {diff})"
        )
        if not allow:
            raise ConfigError(
                msg + ": preprocess the data with the model's tokenizer, or set "
                "data.allow_tokenizer_mismatch=true if you know both give the same ids"
            )
        out.append(msg + " (allowed by data.allow_tokenizer_mismatch)")
    return out


def _read_differently(tok: dict, path: str) -> str | None:
    """Why the same tokenizer files give other ids now, or None. A directory holding only
    tokenizer.model was read with transformers before 2026-12-06 and is read with sentencepiece since
    (as the export always converted it): data preprocessed from such a directory then recorded kind "hf"."""
    from dqo_megatron.tokenizer_files import tokenizer_kind

    # Only that change: a sentencepiece .model file against an HF directory holding the same
    # tokenizer.model is the export's own pairing (tokenizer.json converted with sentencepiece's ids).
    if tok.get("kind") != "hf" or not os.path.isdir(path) or tokenizer_kind(path) != "sentencepiece":
        return None
    return (
        "the same files, but the data was tokenized reading them with transformers, and a directory whose only "
        "tokenizer file is tokenizer.model is read with sentencepiece now (as the export converts it): the ids differ"
    )
