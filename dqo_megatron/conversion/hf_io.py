"""Hugging Face checkpoints on disk: read safetensors shard by shard, write sharded safetensors.

Reading never holds more than the tensors of one shard that are still waiting for their partners (a
fused QKV needs q, k and v, which a sharded checkpoint may keep in different files). Writing plans the
shards from tensor sizes first, then converts, writes and frees one shard at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from dqo_megatron.config import ModelConfig
from dqo_megatron.conversion.layout import fuse_gate_up
from dqo_megatron.conversion.registry import ConversionError, Family, TensorRule
from dqo_megatron.errors import first_line
from dqo_megatron.tokenizer_files import COPIED_FILES


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """`safetensors.safe_open(file)` for torch; ConversionError naming the file when it is not a readable
    safetensors file (truncated, overwritten, not safetensors at all)."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ConversionError(
            f"{file}: not a readable safetensors file (damaged or truncated? {first_line(exc, 200)})"
        ) from None
    with handle:
        yield handle


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="shard" if "shard" in desc else "tensor", leave=False)


@dataclass
class HFCheckpoint:
    """An HF model directory: ``config.json`` plus ``model.safetensors`` or an index and its shards."""

    path: Path
    """The directory."""
    config: dict
    """Parsed config.json."""
    weight_map: dict[str, str]
    """``{tensor name: shard file name}``."""

    @classmethod
    def open(cls, path: str | Path) -> "HFCheckpoint":
        """Read config.json and the tensor index (headers only); ConversionError when the directory,
        config.json, the weights or any shard named by the index is missing."""

        path = Path(path)
        if path.is_file():
            raise ConversionError(
                f"{path} is a file: give the HF model directory that holds it (config.json + safetensors)"
            )
        if not path.is_dir():
            raise ConversionError(f"HF checkpoint directory {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConversionError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{config_file}: not valid JSON ({exc})") from None
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index}: not a safetensors index (no weight_map: {exc})") from None
            missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
            if missing:
                raise ConversionError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        elif (path / SINGLE_FILE).is_file():
            with open_safetensors(path / SINGLE_FILE) as handle:
                weight_map = {name: SINGLE_FILE for name in handle.keys()}
        else:
            found = sorted(p.name for p in path.glob("*.bin")) or sorted(p.name for p in path.iterdir())
            raise ConversionError(
                f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are "
                f"read; found: {', '.join(found[:8]) or 'nothing'})"
            )
        return cls(path=path, config=config, weight_map=weight_map)

    def shards(self) -> list[str]:
        """Shard file names in a stable order."""
        return sorted(set(self.weight_map.values()))

    def dtypes(self) -> set[torch.dtype]:
        """The dtypes of the floating-point tensors (reads headers only)."""

        found = set()
        for shard in self.shards():
            with open_safetensors(self.path / shard) as handle:
                for name in handle.keys():
                    dtype = _safetensors_dtype(handle.get_slice(name).get_dtype())
                    if dtype.is_floating_point:
                        found.add(dtype)
        return found


_ST_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _safetensors_dtype(name: str) -> torch.dtype:
    return _ST_DTYPES.get(name, torch.uint8)


def plan_import(ckpt: HFCheckpoint, family: Family, cfg: ModelConfig) -> list[TensorRule]:
    """The rules for `cfg`, after checking that the checkpoint has every tensor they need and nothing
    else (ignoring what `family.ignored_hf_tensor` says carries no information)."""
    rules = family.rules(cfg)
    needed = {name: rule.megatron for rule in rules for name in rule.hf}
    missing = [f"{name} (for {meg})" for name, meg in needed.items() if name not in ckpt.weight_map]
    if missing:
        raise ConversionError(
            f"{ckpt.path}: tensors missing from the checkpoint: {', '.join(missing[:6])}"
            + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        )
    unexpected = [n for n in ckpt.weight_map if n not in needed and not family.ignored_hf_tensor(n, cfg)]
    if unexpected:
        raise ConversionError(
            f"{ckpt.path}: tensors the {family.name} model has no place for (a different architecture or "
            f"options our model does not build): {', '.join(sorted(unexpected)[:6])}"
            + (f" and {len(unexpected) - 6} more" if len(unexpected) > 6 else "")
        )
    return rules


@dataclass(frozen=True)
class DeferredTensor:
    """A converted tensor not computed yet: `make()` computes it (the rule's `to_megatron` on its inputs).

    `shape` and `dtype` are known without computing it (see `_deferred`). `parts` is set when the
    tensor is the concatenation of these inputs along dim 0 (the gated fc1 = ``[gate; up]``, which
    Megatron's checkpoint stores as those two halves again). The converter's save writes the parts as
    they are (`lean_save.defer`: the fused fc1 is never computed) and computes the others (QKV) just
    before the save.
    """

    shape: torch.Size
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]
    parts: tuple[torch.Tensor, ...] = ()


_ROW_CONCATENATIONS = (fuse_gate_up,)
"""`TensorRule.to_megatron` functions that are ``torch.cat(inputs, dim=0)`` of their same-shaped inputs."""


def _deferred(rule: TensorRule, inputs: tuple[torch.Tensor, ...]) -> Optional[DeferredTensor]:
    """`rule`'s output on `inputs` as a `DeferredTensor`, or None (then compute it now).

    The rules that combine tensors are row re-layouts (QKV interleave, fc1 = [gate; up]): the rule runs
    on probes of the inputs with every dimension after the first reduced to 1, which makes the same
    row checks (a config that disagrees with the weights fails here, as it would computing it) and
    gives the output's rows. Anything that does not look like that -- 1-D inputs (biases: small),
    differing trailing shapes, an output that is not ``[rows, 1, ...]`` -- is computed now; the writer
    checks every deferred value's shape against its parameter when it computes it."""
    first = inputs[0]
    if first.dim() < 2 or any(t.dim() != first.dim() or t.shape[1:] != first.shape[1:] for t in inputs):
        return None
    probes = [torch.zeros((t.shape[0],) + (1,) * (t.dim() - 1), dtype=t.dtype) for t in inputs]
    try:
        rows = rule.to_megatron(*probes)
    except Exception:  # noqa: BLE001 -- the eager call reports it
        return None
    if not isinstance(rows, torch.Tensor) or rows.dim() != first.dim() or any(d != 1 for d in rows.shape[1:]):
        return None
    parts: tuple[torch.Tensor, ...] = ()
    if rule.to_megatron in _ROW_CONCATENATIONS and all(
        t.is_contiguous() and t.shape == first.shape and t.dtype == rows.dtype for t in inputs
    ):
        parts = inputs
    shape = torch.Size((rows.shape[0], *first.shape[1:]))
    return DeferredTensor(shape, rows.dtype, functools.partial(rule.to_megatron, *inputs), parts)


def stream_megatron_tensors(
    ckpt: HFCheckpoint,
    rules: Sequence[TensorRule],
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    defer: bool = False,
) -> Iterator[tuple[str, torch.Tensor | DeferredTensor]]:
    """Yield ``(megatron name, tensor)`` for every rule, reading one shard at a time.

    A rule is converted as soon as all its HF inputs have been read; inputs of rules whose partners live
    in a later shard are kept until then. Tensors are cast to `dtype` when given. Tensors that need no
    conversion are the reader's (safetensors maps the shard: they occupy memory once touched).
    `defer`: rules that combine several inputs (QKV, gated fc1) yield a `DeferredTensor` instead of
    the combined copy.
    """

    by_hf = {name: rule for rule in rules for name in rule.hf}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    shards = ckpt.shards()
    for shard in _progress(shards, len(shards), "reading HF shards", progress):
        with open_safetensors(ckpt.path / shard) as handle:
            for name in handle.keys():
                rule = by_hf.get(name)
                if rule is None:
                    continue
                tensor = handle.get_tensor(name)
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                parts = pending.setdefault(rule.megatron, {})
                parts[name] = tensor
                if len(parts) == len(rule.hf):
                    del pending[rule.megatron]
                    inputs = tuple(parts[n] for n in rule.hf)
                    deferred = _deferred(rule, inputs) if defer and len(inputs) > 1 else None
                    yield rule.megatron, deferred if deferred is not None else rule.to_megatron(*inputs)
    if pending:  # plan_import checked the index; this means the shard files disagree with it
        raise ConversionError(f"{ckpt.path}: incomplete tensors after reading every shard: {sorted(pending)[:6]}")


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"``, ``"500MB"``, ``"2GiB"`` or an integer."""
    if isinstance(text, int):
        return text
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    raw = text.strip().upper()
    for unit, factor in units.items():
        if raw.endswith(unit):
            try:
                return int(float(raw[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(raw)
    except ValueError:
        raise ConversionError(f"cannot read size {text!r} (use e.g. 5GB, 500MB)") from None


def write_hf_safetensors(
    out_dir: Path,
    rules: Sequence[TensorRule],
    get_megatron: Callable[[str], torch.Tensor],
    hf_sizes: Callable[[TensorRule], int],
    max_shard_bytes: int,
    progress: bool = True,
) -> list[str]:
    """Write the HF tensors of `rules` as ``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` +
    index, at most `max_shard_bytes` per shard (a single larger tensor gets a shard of its own).

    `get_megatron(name)` returns the full Megatron tensor; `hf_sizes(rule)` the bytes of its HF tensors
    (to plan shards before converting). Returns the written file names.
    """
    from safetensors.torch import save_file

    groups: list[list[TensorRule]] = [[]]
    used = 0
    for rule in rules:
        size = hf_sizes(rule)
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(rule)
        used += size
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    total = 0
    for file_name, group in _progress(list(zip(names, groups)), n, "writing HF shards", progress):
        tensors: dict[str, torch.Tensor] = {}
        for rule in group:
            for hf_name, tensor in zip(rule.hf, rule.to_hf(get_megatron(rule.megatron))):
                tensors[hf_name] = tensor.contiguous()
                total += tensor.numel() * tensor.element_size()
                weight_map[hf_name] = file_name
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def copy_side_files(src: Path, dst: Path, names: Sequence[str] = COPIED_FILES) -> list[str]:
    """Copy the tokenizer / generation files (`tokenizer_files.COPIED_FILES`) that exist in `src` into `dst`;
    returns the names copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON with a trailing newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
