"""`dqo-megatron preprocess`: records -> tokenized, validated -> Megatron indexed files (see indexed.py).

The main process reads raw lines/rows in chunks; worker processes parse, validate and tokenize them;
results come back in input order (Pool.imap), so the output is byte-identical for any worker count.
Records marked `truncated` (cut by the sampler's length limit) are written without EOS and flagged per
document (tokenize.py, indexed.py); the summary counts them.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.hf_sources import local_inputs
from dqo_megatron.data.indexed import TrajectoryWriter, dataset_files
from dqo_megatron.data.records import RecordError, SkipCounter, expand_inputs, input_format, iter_raw, parse_record
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, tokenize_records
from dqo_megatron.outputs import staged_files
from dqo_megatron.processes import die_with_parent


@dataclass
class PreprocessConfig:
    """Inputs, output and execution of one preprocessing run."""

    inputs: list[str] = field(default_factory=list)
    """Record files (.jsonl/.json, .parquet), `datasets` directories (Dataset or DatasetDict) or hub names
    read from the local cache (`openai/gsm8k`); globs allowed; read in this order. Rows may be in TRL's
    shapes (docs/data.md)."""
    split: str | None = None
    """The split of DatasetDict directories and hub names (None: "train", which must then exist)."""
    output_prefix: str = ""
    """Output path prefix: writes <prefix>_tokens.bin/.idx, ... and <prefix>.json."""
    tokenize: TokenizeConfig | None = None
    """Tokenizer and sequence-length policy."""
    workers: int = 1
    """Tokenizing processes (1: in the main process)."""
    chunk_size: int = 256
    """Records per task sent to a worker."""
    skip_invalid: bool = False
    """Skip invalid records and count them by reason (printed in the summary) instead of stopping at
    the first with its file:line error."""
    overwrite: bool = False
    """Replace an existing dataset at output_prefix (only once the new one is complete); without it an
    existing dataset is an error."""
    progress: bool = True
    """Show a progress bar on stderr."""
    start_method: Literal["fork", "spawn", "forkserver"] = "fork"
    """How workers start; fork is fastest on Linux, spawn is the safe choice inside threaded programs."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("inputs is empty: give at least one record file")
        if not self.output_prefix:
            raise ConfigError("output_prefix is empty: give where to write, e.g. data/gsm8k_train")
        if self.output_prefix.endswith(("/", os.sep)) or os.path.isdir(self.output_prefix):
            raise ConfigError(
                f"output_prefix={self.output_prefix!r} is a directory: give a file prefix inside it, "
                f"e.g. {os.path.join(self.output_prefix, 'train')} (writes train.json, train_*.bin/.idx)"
            )
        if isinstance(self.tokenize, dict):
            self.tokenize = TokenizeConfig(**self.tokenize)
        if self.tokenize is None:
            raise ConfigError("tokenize is missing: give at least tokenize.tokenizer.path")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r}: must be an integer >= 1")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ConfigError(f"chunk_size={self.chunk_size!r}: must be an integer >= 1")
        if self.start_method not in ("fork", "spawn", "forkserver"):
            raise ConfigError(f"start_method={self.start_method!r}: choose fork, spawn or forkserver")


@dataclass
class PreprocessSummary:
    """What a run did."""

    read: int = 0
    written: int = 0
    skips: SkipCounter = field(default_factory=SkipCounter)
    tokens: int = 0
    prompt_tokens: int = 0
    response_tokens: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    """Written records with `truncated: true` (cut by the sampler's length limit; stored without EOS)."""
    length_histogram: dict[str, int] = field(default_factory=dict)
    """Sequence length buckets "[lo, hi)" (powers of two) -> number of written documents."""
    seconds: float = 0.0
    prompts: int = 0

    def report(self) -> str:
        """Human-readable multi-line summary."""
        rate = self.read / self.seconds if self.seconds > 0 else float("nan")
        lines = [
            f"records read: {self.read}, written: {self.written}, prompts: {self.prompts}",
            self.skips.report(),
            f"tokens: {self.tokens} (prompt {self.prompt_tokens}, response {self.response_tokens}); "
            f"prompts truncated from the left: {self.truncated_prompts}; responses cut by the sampler's length "
            f"limit (truncated, no EOS): {self.truncated_responses}",
            f"time: {self.seconds:.2f} s ({rate:.0f} records/s)",
            "sequence lengths:",
        ]
        total = max(self.written, 1)
        for bucket, n in self.length_histogram.items():
            lines.append(f"  {bucket:>16} {n:>9} {'#' * max(1, round(40 * n / total)) if n else ''}")
        return "\n".join(lines)


def _bucket(n: int) -> tuple[int, str]:
    lo = 1 << (max(n, 1).bit_length() - 1)
    return lo, f"[{lo}, {2 * lo})"


_WORKER_TOK: Tokenizer | None = None
_WORKER_CFG: TokenizeConfig | None = None


def _init_worker(cfg: TokenizeConfig, tok: Tokenizer | None = None, parent_pid: int | None = None) -> None:
    global _WORKER_TOK, _WORKER_CFG
    if parent_pid is not None:  # a worker of a killed preprocess ends with it
        die_with_parent(parent_pid)
    _WORKER_CFG = cfg
    _WORKER_TOK = tok if tok is not None else Tokenizer(cfg.tokenizer)


def _work(chunk: list[tuple[str, int, object]]):
    """Parse + tokenize one chunk of (file, line, raw); returns samples and RecordErrors in input order."""
    results: list = [None] * len(chunk)
    recs, slots = [], []
    for i, (file, line, raw) in enumerate(chunk):
        try:
            recs.append(parse_record(raw, file, line, require_reward=True))
            slots.append(i)
        except RecordError as err:
            results[i] = err
    for i, res in zip(slots, tokenize_records(_WORKER_TOK, recs, _WORKER_CFG)):
        results[i] = res
    return results


def _chunks(files: list[str], size: int, split: str | None = None) -> Iterator[list[tuple[str, int, object]]]:
    buf: list = []
    for path in files:
        for line, raw in iter_raw(path, split=split):
            buf.append((path, line, raw))
            if len(buf) >= size:
                yield buf
                buf = []
    if buf:
        yield buf


def _count_inputs(files: list[str]) -> int | None:
    """Records to expect, for the progress bar: a line naming chosen and rejected is likely a pair (two)."""
    total = 0
    for path in files:
        fmt = input_format(path)
        if fmt == "jsonl":
            with open(path, "rb") as f:
                total += sum(1 + (b'"chosen"' in b and b'"rejected"' in b) for b in f if b.strip())
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path).metadata
            pairs = {"chosen", "rejected"} <= set(meta.schema.names)
            total += meta.num_rows * (1 + pairs)
        else:
            return None
    return total


def preprocess(cfg: PreprocessConfig) -> PreprocessSummary:
    """Read, validate and tokenize records, and write them as an indexed trajectory dataset.

    Args:
        cfg: a PreprocessConfig.
    Returns:
        A PreprocessSummary (also written into the manifest under "summary").
    Raises:
        RecordError: the first invalid record, unless cfg.skip_invalid (then it is counted).
        ValueError: no record survived.
        OutputError (a ValueError): a dataset exists at cfg.output_prefix and not cfg.overwrite, or the
            output would overwrite an input.
    """
    t0 = time.perf_counter()
    files = expand_inputs(cfg.inputs)
    tok = Tokenizer(cfg.tokenize.tokenizer)  # fail early, in the main process, on a bad tokenizer
    # everything is written into a hidden sibling directory and moved into place once complete: a
    # rejected record or a kill leaves an existing dataset at output_prefix as it was
    inputs = local_inputs(list(cfg.inputs) + files) + [cfg.tokenize.tokenizer.path]
    with staged_files(
        dataset_files(cfg.output_prefix), overwrite=cfg.overwrite, inputs=inputs, what=f"dataset {cfg.output_prefix}"
    ) as staging:
        return _write_dataset(cfg, files, tok, str(staging / os.path.basename(cfg.output_prefix)), t0)


def _write_dataset(
    cfg: PreprocessConfig, files: list[str], tok: Tokenizer, prefix: str, t0: float
) -> PreprocessSummary:
    """Tokenize the records of `files` into a dataset at `prefix` (the staging copy of cfg.output_prefix)."""
    from tqdm import tqdm

    summary = PreprocessSummary()
    lengths: Counter[int] = Counter()  # written documents per length bucket, keyed by the bucket's lower end
    file_index = {f: i for i, f in enumerate(files)}
    writer = TrajectoryWriter(prefix, tok.vocab_size)
    bar = tqdm(
        total=_count_inputs(files) if cfg.progress else None,
        disable=not cfg.progress,
        unit="rec",
        desc="preprocess",
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        # Frozen before the pool forks its workers (see _gc_frozen).
        with _gc_frozen(), _tokenized_chunks(cfg, files, tok) as results:
            for chunk_results in results:
                _write_chunk(writer, chunk_results, summary, lengths, file_index, cfg.skip_invalid)
                bar.update(len(chunk_results))
                if summary.skips.total:
                    bar.set_postfix(skipped=summary.skips.total, refresh=False)
            if summary.written == 0:
                raise ValueError(f"no valid record in {files}\n{summary.skips.report()}")
            summary.response_tokens = summary.tokens - summary.prompt_tokens
            summary.length_histogram = {_bucket(lo)[1]: lengths[lo] for lo in sorted(lengths)}
            summary.prompts = len(writer.prompt_index)
            summary.seconds = time.perf_counter() - t0
            writer.finalize(_manifest(cfg, tok, files, summary))
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return summary


@contextmanager
def _gc_frozen() -> Iterator[None]:
    """Keep the objects that exist now out of the cyclic GC's full collections while records stream through.

    They are torch, megatron, transformers (~0.5M objects), and their full collections cost ~15% of the
    run; freezing before forking workers is also what the gc docs recommend. Nothing is collected
    differently: objects created during the run are tracked as usual, and the frozen ones return to the
    oldest generation at the end. Left alone when the caller froze objects itself or disabled the GC.
    """
    frozen = gc.isenabled() and gc.get_freeze_count() == 0
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


@contextmanager
def _tokenized_chunks(cfg: PreprocessConfig, files: list[str], tok: Tokenizer) -> Iterator[Iterator[list]]:
    """The parsed and tokenized records of `files`, one list (samples and RecordErrors) per chunk, in input order.

    cfg.workers > 1: from a pool of worker processes (each loads its own tokenizer; the pool ends with
    the block); 1: in this process, with `tok`.
    """
    if cfg.workers == 1:
        _init_worker(cfg.tokenize, tok)
        yield map(_work, _chunks(files, cfg.chunk_size, cfg.split))
        return
    pool = mp.get_context(cfg.start_method).Pool(
        cfg.workers, initializer=_init_worker, initargs=(cfg.tokenize, None, os.getpid())
    )
    try:
        yield pool.imap(_work, _chunks(files, cfg.chunk_size, cfg.split))
    finally:
        pool.terminate()
        pool.join()


def _write_chunk(
    writer: TrajectoryWriter,
    chunk_results: list,
    summary: PreprocessSummary,
    lengths: Counter[int],
    file_index: dict[str, int],
    skip_invalid: bool,
) -> None:
    """Write one chunk's samples and count them (and its invalid records) into `summary` and `lengths`.

    An invalid record raises its RecordError unless `skip_invalid`, after the samples before it are
    written, so that errors come in input order whatever the chunk size.
    """
    samples: list = []  # written once per chunk (same bytes as one write per sample)
    for res in chunk_results:
        summary.read += 1
        if isinstance(res, RecordError):
            if not skip_invalid:
                writer.add_many(samples, [file_index[s.file] for s in samples])
                raise res
            summary.skips.add(res)
            continue
        samples.append(res)
        summary.tokens += len(res.tokens)
        summary.prompt_tokens += res.prompt_length
        summary.truncated_prompts += res.truncated_prompt_tokens > 0
        summary.truncated_responses += res.truncated
        lengths[_bucket(len(res.tokens))[0]] += 1
    writer.add_many(samples, [file_index[s.file] for s in samples])
    summary.written += len(samples)


def _manifest(cfg: PreprocessConfig, tok: Tokenizer, files: list[str], summary: PreprocessSummary) -> dict:
    """What the dataset's manifest records of its making: tokenizer identity, inputs, settings, summary."""
    tok_cfg = cfg.tokenize
    return {
        "tokenizer": {
            "name": tok.name,
            "kind": tok_cfg.tokenizer.kind,
            "eos_id": int(tok.eos_id),
            "bos_id": int(tok.bos_id),
            **tok.identity(),
        },
        "inputs": [os.path.basename(f) for f in files],
        "settings": {
            "max_length": tok_cfg.max_length,
            "overlong": tok_cfg.overlong,
            "behavior_logprobs_include_eos": tok_cfg.behavior_logprobs_include_eos,
            "skip_invalid": cfg.skip_invalid,
            "split": cfg.split,
        },
        "summary": {
            "read": summary.read,
            "written": summary.written,
            "skipped": dict(sorted(summary.skips.counts.items())),
            "tokens": summary.tokens,
            "truncated_prompts": summary.truncated_prompts,
            "truncated_responses": summary.truncated_responses,
            "length_histogram": summary.length_histogram,
        },
    }


def config_dict(cfg: PreprocessConfig) -> dict:
    """The config as a plain dict (for logs)."""
    return asdict(cfg)
