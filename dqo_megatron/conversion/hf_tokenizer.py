"""The tokenizer and generation config of an HF export, so that the export directory alone is a complete model.

An export takes its tokenizer from an HF tokenizer directory (its files are copied as they are: tokenizer.json,
tokenizer_config.json with its chat template, special_tokens_map.json, ...) or from a sentencepiece ``.model``
file, which is converted into an HF fast tokenizer (tokenizer.json) that gives the ids the training tokenizer
(`dqo_megatron.data.tokenize.Tokenizer`) gives:

* ``tok(prompt)["input_ids"] == [BOS] + sp.encode(prompt)`` (the prompt framing of training and generation),
* ``tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)`` (responses),
* ``tok.decode(ids, skip_special_tokens=True) == sp.decode(ids)`` for what a model generates.

Sentencepiece normalizes the whole text (character map, extra spaces removed, one "▁" prepended, spaces
made "▁") and then runs BPE over it with its user-defined symbols kept whole. The converted tokenizer does
the same with a `tokenizers` normalizer and no pre-tokenizer (transformers' own conversions split the text
first, which moves the "▁" the user-defined "\\n" of the demo tokenizer follows, and add no BOS by default).

Known differences, none of which a prompt or a model's answer meets in practice: the text of a special
token (``"<s>"``, ``"</s>"``, ``"<pad>"``) inside a string is that token for HF (sentencepiece spells it out,
character by character); decoding invalid UTF-8 byte pieces yields one U+FFFD per byte, and a decoded text
that starts with <unk> or with a lone "▁" piece before a "▁"-piece keeps one space sentencepiece drops.

A ``tokenizer.model`` is copied beside tokenizer.json, so the export's tokenizer has the identity of the
training data's (`data.tokenize.tokenizer_difference` compares a lone sentencepiece model with it). Which
files make a directory an HF tokenizer or a sentencepiece model is `dqo_megatron.tokenizer_files`' rule,
the one training reads tokenizers by. An export reads its tokenizer once (`read_export_tokenizer`): the
sentencepiece model parsed there is what is checked and converted.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from dqo_megatron.conversion import hf_io
from dqo_megatron.conversion.registry import ConversionError
from dqo_megatron.errors import first_line
from dqo_megatron.tokenizer_files import (
    COPIED_FILES,
    GENERATION_CONFIG,
    SENTENCEPIECE_FILE,
    TOKENIZER_FILES,
    holds_tokenizer,
    sentencepiece_model_file,
)

logger = logging.getLogger(__name__)

TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# sentencepiece's ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


@dataclass(frozen=True)
class ExportTokenizer:
    """The tokenizer an export ships, read once: an HF tokenizer directory (its files are copied) or a
    sentencepiece model (`model_file`, parsed into `proto` and checked convertible: it is converted)."""

    path: Path
    """What was given: a sentencepiece .model file or a directory (one that does not exist ships nothing)."""
    model_file: Optional[Path] = None
    """The sentencepiece model converted (`tokenizer_files.sentencepiece_model_file`); None for HF."""
    proto: Any = None
    """`model_file` parsed (sentencepiece's ModelProto); None for HF."""


def read_export_tokenizer(source: str | Path) -> ExportTokenizer:
    """`source` read as an export reads it: a sentencepiece model (a .model file or a directory holding only
    tokenizer.model) parsed and checked convertible, ConversionError naming the file otherwise; anything
    else as the directory whose tokenizer files are copied."""
    source = Path(source)
    model_file = sentencepiece_model_file(source)
    if model_file is None:
        return ExportTokenizer(source)
    proto = _read_proto(model_file)
    _check_convertible(proto, model_file)
    return ExportTokenizer(source, model_file, proto)


def checked_tokenizer_source(tokenizer: Optional[str | Path | ExportTokenizer]) -> Optional[ExportTokenizer]:
    """`tokenizer` (an export's --tokenizer) read (`read_export_tokenizer`) when it is a sentencepiece ``.model``
    file or a directory holding tokenizer files, and a sentencepiece model one that converts with the same ids;
    ConversionError naming the path otherwise. Cheap (reads the tokenizer only): called before a checkpoint
    loads. An `ExportTokenizer` is returned as it is (read and checked already)."""
    if tokenizer is None or isinstance(tokenizer, ExportTokenizer):
        return tokenizer
    path = Path(tokenizer)
    if not path.exists():
        raise ConversionError(f"--tokenizer {path} does not exist (give an HF tokenizer directory or a .model file)")
    if path.is_file() and path.suffix != ".model":
        raise ConversionError(
            f"--tokenizer {path} is a file but not a sentencepiece .model: give a .model file or the "
            "directory holding the tokenizer files (tokenizer.json / tokenizer_config.json ...)"
        )
    if not holds_tokenizer(path):
        raise ConversionError(f"--tokenizer {path} holds no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    return read_export_tokenizer(path)


def _read_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: not a model, whatever the cause
        raise ConversionError(f"tokenizer {model_file}: not a sentencepiece model ({first_line(exc)})") from None
    if not proto.pieces:
        raise ConversionError(f"tokenizer {model_file}: not a sentencepiece model (no pieces)")
    return proto


def _check_convertible(proto, model_file: Path) -> None:
    """ConversionError for the sentencepiece models whose ids a converted tokenizer would not reproduce."""
    why = None
    if proto.trainer_spec.model_type != _BPE:
        why = "it is not a BPE model (unigram Viterbi ties break differently in `tokenizers`)"
    elif proto.trainer_spec.treat_whitespace_as_suffix:
        why = "it treats whitespace as a suffix"
    else:
        user = [p.piece for p in proto.pieces if p.type == _USER_DEFINED]
        long = [u for u in user if len(u) != 1]
        if long:
            why = f"its user-defined symbols {long[:3]} have more than one character"
        elif any(u in p.piece for u in user for p in proto.pieces if p.type == _NORMAL and len(p.piece) > 1):
            why = "a piece holds one of its user-defined symbols"
    if why:
        raise ConversionError(
            f"tokenizer {model_file}: cannot be converted to an HF tokenizer with the same ids ({why}); "
            "give the directory of an HF tokenizer instead"
        )


def _bpe_model(proto):
    """Sentencepiece BPE as `tokenizers` BPE: every id kept; the merges of NORMAL pieces, best score first
    (sentencepiece merges the adjacent pair whose joined piece scores highest)."""
    from tokenizers.models import BPE

    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    mergeable = {p.piece: p.score for p in pieces if p.type == _NORMAL}
    merges = []
    for piece, score in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, vocab[piece], cut, left, right))
    merges.sort()
    return BPE(
        vocab=vocab,
        merges=[(left, right) for *_, left, right in merges],
        unk_token=pieces[proto.trainer_spec.unk_id].piece,
        fuse_unk=True,  # sentencepiece gives one <unk> for a run of unknown characters
        byte_fallback=proto.trainer_spec.byte_fallback,
    )


def _normalizer(spec):
    """Sentencepiece's normalization of the whole text; it runs on each stretch between special tokens, so
    ``"<s>" + prompt`` (how `Tokenizer` frames a template-less HF prompt) gives BOS + the prompt's own ids."""
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:  # spaces only: sentencepiece keeps newlines and tabs
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def _decoder(proto):
    from tokenizers import decoders

    steps = [
        decoders.Replace(proto.pieces[proto.trainer_spec.unk_id].piece, proto.trainer_spec.unk_surface),
        decoders.Replace("▁", " "),
    ]
    if proto.trainer_spec.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def sentencepiece_to_hf(model_file: str | Path, proto: Any = None):
    """A `tokenizers.Tokenizer` giving the ids of sentencepiece model `model_file`, with BOS before every
    sequence (as the training tokenizer frames prompts), and its special tokens ``{"bos_token": ...}``.

    `proto`: the model already parsed and checked (`ExportTokenizer.proto`); None reads `model_file`.
    ConversionError for a file that is not a sentencepiece model or whose ids could not be reproduced."""
    from tokenizers import AddedToken, Tokenizer, processors

    if proto is None:
        model_file = Path(model_file)
        proto = _read_proto(model_file)
        _check_convertible(proto, model_file)
    tok = Tokenizer(_bpe_model(proto))
    tok.normalizer = _normalizer(proto.normalizer_spec)
    tok.decoder = _decoder(proto)
    # control pieces are special tokens (skipped by decode(skip_special_tokens=True), as sentencepiece skips
    # them); <unk> is not one, so that decoding spells it as sentencepiece does
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == _CONTROL]
    )
    ts, specials = proto.trainer_spec, {}
    for name, index in (("bos_token", ts.bos_id), ("eos_token", ts.eos_id), ("pad_token", ts.pad_id)):
        if 0 <= index < len(proto.pieces) and proto.pieces[index].type == _CONTROL:
            specials[name] = proto.pieces[index].piece
    if "bos_token" in specials:
        bos = specials["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ts.bos_id)]
        )
    return tok, specials


def write_sentencepiece_tokenizer(
    model_file: str | Path, out: str | Path, max_length: Optional[int] = None, proto: Any = None
) -> list[str]:
    """Write sentencepiece model `model_file` into directory `out` as an HF fast tokenizer (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json) plus the model itself as tokenizer.model; returns the
    names written. `max_length` becomes ``model_max_length`` (the model's context); `proto` as for
    `sentencepiece_to_hf`."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    tok, specials = sentencepiece_to_hf(model_file, proto)
    extra = {"model_max_length": max_length} if max_length else {}
    # clean_up_tokenization_spaces would rewrite " ." as "." on decode: sentencepiece does not
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **specials, **extra)
    hf.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("backend", None)  # transformers 5 writes its own class name; this one loads in 4 and 5
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    hf_io.write_json(config_file, config)
    hf_io.write_json(out / "special_tokens_map.json", specials)
    if Path(model_file).resolve() != (out / SENTENCEPIECE_FILE).resolve():
        shutil.copyfile(model_file, out / SENTENCEPIECE_FILE)
    return sorted(p.name for p in out.iterdir() if p.name in COPIED_FILES)


def _tokenizer_ids(out: Path) -> dict[str, Any]:
    """bos/eos/pad ids of the tokenizer written to `out` ({} when transformers cannot load it)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - side files that are not a loadable tokenizer are shipped as they are
        logger.warning("%s: transformers cannot load the exported tokenizer (%s)", out, first_line(exc))
        return {}
    ids = {f"{n}_id": getattr(tok, f"{n}_id", None) for n in ("bos_token", "eos_token", "pad_token")}
    return {k: v for k, v in ids.items() if isinstance(v, int)}


def complete_token_ids(out: Path, has_tokenizer: bool = True) -> dict:
    """Fill the bos/eos/pad ids that ``out/config.json`` lacks from the exported tokenizer, and write
    generation_config.json (unless the tokenizer source brought one): those ids, greedy by default.
    Returns the generation config."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    found = _tokenizer_ids(out) if has_tokenizer else {}
    missing = {k: v for k, v in found.items() if config.get(k) is None}
    if missing and config_file.is_file():
        hf_io.write_json(config_file, {**config, **missing})
        config.update(missing)
    if (out / GENERATION_CONFIG).is_file():
        return json.loads((out / GENERATION_CONFIG).read_text())
    generation = {k: config[k] for k in TOKEN_ID_KEYS if config.get(k) is not None}
    if "pad_token_id" not in generation and "eos_token_id" in generation:  # generate() pads with EOS anyway
        eos = generation["eos_token_id"]
        generation["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    generation.update(do_sample=False, _from_model_config=False)
    hf_io.write_json(out / GENERATION_CONFIG, generation)
    return generation


def check_tokenizer_fits(tokenizer: str | Path | ExportTokenizer, vocab_size: int) -> None:
    """ConversionError when the tokenizer to ship with a model has more tokens than the model has
    embedding rows: it would produce ids the model cannot take. (Fewer is normal: vocabularies are padded.)
    `tokenizer`: a path read by `read_export_tokenizer` (a sentencepiece model's pieces are counted, an HF
    directory is loaded by transformers) or what it returned."""
    tok = tokenizer if isinstance(tokenizer, ExportTokenizer) else read_export_tokenizer(tokenizer)
    if tok.proto is not None:
        where, size = tok.model_file, len(tok.proto.pieces)
    elif tok.path.is_dir():
        try:
            from transformers import AutoTokenizer

            where, size = tok.path, len(AutoTokenizer.from_pretrained(str(tok.path), local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - side files that are not a loadable tokenizer are copied as they are
            logger.warning(
                "%s: not checked against the model's vocabulary (transformers cannot load it: %s)",
                tok.path,
                type(exc).__name__,
            )
            return
    else:
        return
    if size > vocab_size:
        raise ConversionError(
            f"tokenizer {where} has {size} tokens, the model {vocab_size}: it does not belong to this model "
            "(ids beyond the vocabulary cannot be embedded)"
        )


def export_tokenizer(
    source: Optional[str | Path | ExportTokenizer], out: Path, vocab_size: Optional[int] = None
) -> list[str]:
    """Give HF export directory `out` (config.json written) its tokenizer and generation config.

    `source`: an HF tokenizer directory (its tokenizer and generation files copied), a sentencepiece .model
    file or a directory holding only one (converted, `write_sentencepiece_tokenizer`), either as read by
    `read_export_tokenizer` already, or None. With `vocab_size`, a sentencepiece vocabulary larger than it is
    refused (`megatron_to_hf` checks before the weights instead). Returns the names of the files written."""
    config_file = out / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    written: list[str] = []
    tok = source if source is None or isinstance(source, ExportTokenizer) else read_export_tokenizer(source)
    if tok is not None and tok.proto is not None:
        if vocab_size is not None:
            check_tokenizer_fits(tok, vocab_size)
        max_length = config.get("max_position_embeddings")
        written = write_sentencepiece_tokenizer(tok.model_file, out, max_length, tok.proto)
        if tok.path.is_dir() and (tok.path / GENERATION_CONFIG).is_file():
            written += hf_io.copy_side_files(tok.path, out, (GENERATION_CONFIG,))
    elif tok is not None and tok.path.is_dir():
        written = hf_io.copy_side_files(tok.path, out)
    has_tokenizer = any(name != GENERATION_CONFIG for name in written)
    if not has_tokenizer:
        logger.warning(
            "%s: exported without a tokenizer (none in %s): give one with --tokenizer (a directory or a .model file)",
            out,
            None if tok is None else tok.path,
        )
    complete_token_ids(out, has_tokenizer)
    return sorted(set(written) | {GENERATION_CONFIG})
