"""Dtype names: every command and config key that takes a dtype accepts the same spellings.

`fp32`/`float32`, `bf16`/`bfloat16`, `fp16`/`float16` (and `auto` where a default is resolved per
machine) mean the same everywhere; `canonical_dtype` turns any of them into the short name the configs
store, `torch_dtype_name` into the long name torch, transformers and vLLM take, `torch_dtype` into the
torch dtype itself, and `dtype_from_torch` a torch dtype back into the short name. This is the one table
of these names: the modules that build models, convert checkpoints or generate use it. Importing this
module does not import torch (`torch_dtype` does, when called).
"""

from __future__ import annotations

from dqo_megatron.config.loader import ConfigError

DTYPE_ALIASES = {
    "fp32": "fp32",
    "float32": "fp32",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
}
"""Every accepted spelling -> the short name."""

TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short name -> torch's name (`torch.bfloat16`, transformers' and vLLM's `dtype="bfloat16"`)."""

DTYPE_HELP = "auto | fp32 (= float32) | bf16 (= bfloat16) | fp16 (= float16)"
"""How the dtype options' help texts name the choices."""


def canonical_dtype(name: str, where: str = "dtype", allow_auto: bool = True) -> str:
    """`name` in any accepted spelling (case-insensitive) -> "auto", "fp32", "bf16" or "fp16";
    ConfigError naming `where` otherwise."""
    key = str(name).strip().lower()
    if allow_auto and key == "auto":
        return "auto"
    if key not in DTYPE_ALIASES:
        choices = DTYPE_HELP if allow_auto else DTYPE_HELP.removeprefix("auto | ")
        exc = ConfigError(f"{where}={name!r}: choose {choices}")
        exc.key = where  # a command-line override that set it is blamed, not the YAML file
        raise exc
    return DTYPE_ALIASES[key]


def torch_dtype_name(name: str, where: str = "dtype") -> str:
    """`name` in any accepted spelling -> "auto", "float32", "bfloat16" or "float16"."""
    short = canonical_dtype(name, where)
    return TORCH_NAMES.get(short, short)


def torch_dtype(name: str, where: str = "dtype"):
    """`name` in any accepted spelling except auto -> ``torch.float32``, ``torch.bfloat16`` or
    ``torch.float16``; ConfigError naming `where` otherwise."""
    import torch

    return getattr(torch, TORCH_NAMES[canonical_dtype(name, where, allow_auto=False)])


def dtype_from_torch(dtype) -> str | None:
    """A torch dtype -> "fp32", "bf16" or "fp16"; None for one no command takes (float64, int8, ...)."""
    name = str(dtype).removeprefix("torch.")
    return next((short for short, long in TORCH_NAMES.items() if long == name), None)
