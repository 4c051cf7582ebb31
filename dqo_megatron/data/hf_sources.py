"""`datasets` inputs: a saved `Dataset` or `DatasetDict` directory (one split of it), or a hub name read from
the local HF datasets cache only.

Nothing is downloaded: a hub name (`openai/gsm8k`, `openai/gsm8k:main` with a configuration) is opened
through `datasets`' cache builder, the same path `load_dataset` takes with `HF_DATASETS_OFFLINE=1`, and
a name that is not cached fails with one line saying how to provide the data. Records (`data.records`)
and problem sets (`tasks.datasets`) read their `datasets` inputs here.
"""

from __future__ import annotations

import json
import os
import re

DEFAULT_SPLIT = "train"
"""The split a DatasetDict input gives when none is named and it has one by that name."""

_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?(:[\w.-]+)?")
_FILE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".gz", ".zst")


def saved_kind(path: str) -> str | None:
    """ "dataset" or "dataset_dict" for a `save_to_disk` directory, else None."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return "dataset_dict"
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_info.json")):
        return "dataset"
    return None


def is_hub_name(source: str) -> bool:
    """A `datasets` hub name (`owner/name`, `name`, optionally `:config`) that is no path on this machine."""
    return (
        not os.path.exists(source)
        and _HUB_NAME.fullmatch(source) is not None
        and not source.lower().endswith(_FILE_SUFFIXES)
    )


def not_a_dataset_dir(path: str) -> str:
    """The one-line error for a directory that `save_to_disk` did not write."""
    return (
        f"{path} is a directory but no `datasets` save_to_disk directory (neither a Dataset's state.json nor "
        "a DatasetDict's dataset_dict.json); give a record file, or a directory written by save_to_disk"
    )


def choose_split(source: str, splits: list[str], split: str | None, default: str | None = DEFAULT_SPLIT) -> str:
    """The split to read of a DatasetDict with `splits`: the named one, else `default` when present.

    `default=None`: a lone split is taken, more need a name. Raises ValueError listing the splits.
    """
    if split is not None:
        if split in splits:
            return split
        raise ValueError(f"{source} has no split {split!r}; its splits: {splits}")
    if default is not None and default in splits:
        return default
    if default is None and len(splits) == 1:
        return splits[0]
    lack = f" and no {default!r}" if default else ""
    raise ValueError(
        f"{source} holds the splits {splits}{lack}: name one as {source}@SPLIT (any command; preprocess also "
        "takes --split), or give the split's own directory"
    )


def split_suffix(source: str, split: str | None) -> tuple[str, str | None]:
    """``("dir", "test")`` for ``"dir@test"`` when ``dir@test`` itself does not exist; a split given both
    ways must agree (ValueError)."""
    base, at, suffix = source.rpartition("@")
    if not at or not base or not suffix or os.path.exists(source):
        return source, split
    if split is not None and split != suffix:
        raise ValueError(f"{source}: the split {suffix!r} in the name and {split!r} given as --split disagree")
    return base, suffix


def local_inputs(sources) -> list[str]:
    """The paths on this machine that `sources` (files, directories, ``DIR@split``, hub names) read: what
    an output must stay apart from (``DIR@test`` reads DIR; a hub name reads no path the user gave)."""
    out = []
    for source in map(str, sources):
        base = split_suffix(source, None)[0]
        if not is_hub_name(base):
            out.append(base)
    return out


def open_dataset(source: str, split: str | None = None, default_split: str | None = DEFAULT_SPLIT):
    """One split of a saved directory or a cached hub dataset, as a `datasets.Dataset`.

    Args:
        source: a `save_to_disk` directory (Dataset or DatasetDict) or a hub name (`owner/name[:config]`),
            either with an optional ``@split`` suffix (what commands without a --split option take).
        split: the split to read; None: the suffix's, else `default_split` (see `choose_split`).
        default_split: the split taken when none is named ("train"); None: only a lone split is taken.
    Raises:
        ValueError (one line): an unknown split (listing the splits), a directory `save_to_disk` did not
        write, or a hub name that is not in the local cache.
    """
    import datasets

    source, split = split_suffix(source, split)
    if not os.path.isdir(source):
        return _from_cache(source, split, default_split)
    kind = saved_kind(source)
    if kind is None:
        raise ValueError(not_a_dataset_dir(source))
    if kind == "dataset_dict":
        with open(os.path.join(source, "dataset_dict.json"), encoding="utf-8") as f:
            splits = list(json.load(f).get("splits", []))
        chosen = choose_split(source, splits, split, default_split)
        return datasets.load_from_disk(os.path.join(source, chosen))
    ds = datasets.load_from_disk(source)
    if split is not None and ds.split is not None and str(ds.split) != split:
        raise ValueError(f"{source} holds the split {str(ds.split)!r}, not {split!r}")
    return ds


def _unavailable(source: str, why: str) -> ValueError:
    return ValueError(
        f"{source}: no such file or directory, and as a `datasets` hub name it is not available offline ({why}); "
        f"nothing is downloaded: on a machine with network run `datasets.load_dataset({source.split(':')[0]!r})"
        "[split].save_to_disk(DIR)` and pass DIR (or a DatasetDict directory with --split), or pass a JSONL file"
    )


def _from_cache(source: str, split: str | None, default_split: str | None):
    """A hub dataset from the local cache: `datasets`' own cache builder, which never goes to the network."""
    import datasets
    from datasets.packaged_modules.cache.cache import Cache

    if not is_hub_name(source):
        raise FileNotFoundError(f"input {source!r} does not exist")
    name, _, config = source.partition(":")
    try:
        builder = Cache(
            repo_id=name, dataset_name=name.split("/")[-1], config_name=config or None, version="auto", hash="auto"
        )
    except (ValueError, FileNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()
        why = " ".join(first[:2]) if first else type(exc).__name__
        if "multiple" in why:
            why += f"; name one as {name}:CONFIG"
        raise _unavailable(source, f"not in the cache at {datasets.config.HF_DATASETS_CACHE}: {why}") from None
    splits = list(builder.info.splits or {})
    if not splits:
        raise _unavailable(source, f"the cache at {builder.cache_dir} lists no split")
    chosen = choose_split(source, splits, split, default_split)
    return builder.as_dataset(split=chosen)
