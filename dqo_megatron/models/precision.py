"""Can this machine train in the configured precision? And how megatron-core is told to.

Checked before Megatron builds anything, so that a wrong setting fails with the field to change instead
of an assertion deep inside Transformer Engine (or, worse, silently: the local layer spec has no FP8
GEMMs, so FP8 with it would quietly train in bf16).

What FP8 needs, by recipe (`precision.fp8`; Transformer Engine's own support checks and megatron-core
0.16.1's `fp8_utils.get_fp8_recipe`, which maps each name to a TE recipe class):

    recipe      TE recipe class         compute capability      CUDA     TE
    delayed     DelayedScaling          >= 8.9 (Ada, Hopper+)   -        any Megatron supports
    tensorwise  Float8CurrentScaling    >= 8.9                  -        >= 2.2.0.dev0
    blockwise   Float8BlockScaling      >= 9.0                  >= 12.9  >= 2.3.0.dev0
    mxfp8       MXFP8BlockScaling       10.x / 11.x (Blackwell) -        >= 2.1.0

plus the TE layer spec (hence TE importable and CUDA), bf16 parameters, and GEMM dimensions that are
multiples of 16 (32 for mxfp8; `dqo_megatron.config.schema.fp8_dimension_problems`). When TE is
importable it is asked as well (its `is_*_available` functions), since its checks follow the installed
version. `Hardware` is a plain value so tests can fake a GPU on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig
from dqo_megatron.config.schema import fp8_dimension_problems


@dataclass(frozen=True)
class Hardware:
    """What the precision checks need to know about this process's device and libraries."""

    cuda: bool
    """`torch.cuda.is_available()`."""
    device_name: Optional[str] = None
    """`torch.cuda.get_device_name()` (None without CUDA)."""
    capability: Optional[tuple[int, int]] = None
    """Compute capability (major, minor), e.g. (9, 0) for Hopper; None without CUDA."""
    cuda_version: Optional[str] = None
    """CUDA version torch was built with (`torch.version.cuda`), e.g. "12.9"."""
    te_version: Optional[str] = None
    """Transformer Engine's version when it is usable here, else None."""
    te_reason: str = ""
    """Why Transformer Engine is not usable (empty when it is)."""


def detect_hardware() -> Hardware:
    """This process's `Hardware` (the current CUDA device)."""
    from dqo_megatron.compat import transformer_engine_status

    cuda = torch.cuda.is_available()
    usable, reason = transformer_engine_status()
    te_version = _transformer_engine_version() if usable else None
    if not cuda:
        return Hardware(cuda=False, te_version=te_version, te_reason="" if usable else reason)
    return Hardware(
        cuda=True,
        device_name=torch.cuda.get_device_name(),
        capability=tuple(torch.cuda.get_device_capability()),
        cuda_version=torch.version.cuda,
        te_version=te_version,
        te_reason="" if usable else reason,
    )


def _transformer_engine_version() -> Optional[str]:
    """The importable Transformer Engine's version (call only when it is usable)."""
    try:
        import transformer_engine
    except Exception:  # noqa: BLE001
        return None
    return str(getattr(transformer_engine, "__version__", "0"))


@dataclass(frozen=True)
class FP8Requirement:
    """What one FP8 recipe needs (see the module docstring's table)."""

    min_capability: tuple[int, int]
    max_capability: Optional[tuple[int, int]]  # exclusive
    min_cuda: Optional[str]
    min_te: Optional[str]
    hardware: str  # in words, for the error message


FP8_REQUIREMENTS: dict[str, FP8Requirement] = {
    "delayed": FP8Requirement((8, 9), None, None, None, "an Ada, Hopper or Blackwell GPU"),
    "tensorwise": FP8Requirement((8, 9), None, None, "2.2.0.dev0", "an Ada, Hopper or Blackwell GPU"),
    "blockwise": FP8Requirement((9, 0), None, "12.9", "2.3.0.dev0", "a Hopper or Blackwell GPU and CUDA >= 12.9"),
    "mxfp8": FP8Requirement((10, 0), (12, 0), None, "2.1.0", "a Blackwell data-centre GPU (B200/GB200/B300)"),
}

_TE_CHECKS = {
    "delayed": "is_fp8_available",
    "tensorwise": "is_fp8_available",
    "blockwise": "is_fp8_block_scaling_available",
    "mxfp8": "is_mxfp8_available",
}
_TE_CHECKS_OLD = {
    "delayed": "check_fp8_support",
    "tensorwise": "check_fp8_support",
    "blockwise": "check_fp8_block_scaling_support",
    "mxfp8": "check_mxfp8_support",
}


def _version(text: str):
    from packaging.version import Version

    return Version(text)


def fp8_support_problems(precision: PrecisionConfig, hardware: Hardware, backend: str) -> list[str]:
    """Why `precision.fp8` cannot run here (empty when it can, or without FP8). Hardware only;
    dimensions are `fp8_dimension_problems`."""
    recipe = precision.fp8
    if recipe is None:
        return []
    need = FP8_REQUIREMENTS[recipe]
    field = f"precision.fp8={recipe}"
    if not hardware.cuda:
        return [
            f"{field} needs {need.hardware} with Transformer Engine; CUDA is not available here "
            "(unset precision.fp8 to train in bf16/fp32)"
        ]
    problems = []
    if hardware.te_version is None:
        problems.append(
            f"{field} needs Transformer Engine, which is not usable here ({hardware.te_reason}); use "
            "NVIDIA's PyTorch container (see docs/gpu.md) or unset precision.fp8"
        )
    elif backend != "te":
        problems.append(
            f"{field} needs the Transformer Engine layer spec; the model is being built with the "
            f"'{backend}' spec, whose linears have no FP8 GEMMs (build with backend='auto' or 'te')"
        )
    cap = hardware.capability or (0, 0)
    if cap < need.min_capability or (need.max_capability is not None and cap >= need.max_capability):
        below = "" if need.max_capability is None else " and < {}.{}".format(*need.max_capability)
        problems.append(
            f"{field} needs {need.hardware} (compute capability >= {need.min_capability[0]}."
            f"{need.min_capability[1]}{below}); "
            f"this {hardware.device_name or 'GPU'} has {cap[0]}.{cap[1]}"
            f"{' (use precision.fp8=delayed or tensorwise on Hopper)' if recipe == 'mxfp8' and cap >= (8, 9) else ''}"
        )
    if need.min_cuda and hardware.cuda_version and _version(hardware.cuda_version) < _version(need.min_cuda):
        problems.append(f"{field} needs CUDA >= {need.min_cuda}; torch here is built with CUDA {hardware.cuda_version}")
    if need.min_te and hardware.te_version and _version(hardware.te_version) < _version(need.min_te):
        problems.append(f"{field} needs Transformer Engine >= {need.min_te}; installed: {hardware.te_version}")
    if precision.fp8_param and hardware.te_version and _version(hardware.te_version) < _version("2.0"):
        problems.append(f"precision.fp8_param=true needs Transformer Engine >= 2.0; installed: {hardware.te_version}")
    return problems


def te_recipe_support(recipe: str) -> Optional[tuple[bool, str]]:
    """Transformer Engine's own verdict on `recipe` for the current device, or None when TE is not
    importable or its version has no such check."""
    try:
        import transformer_engine.pytorch as te
    except Exception:  # noqa: BLE001 - TE raises OSError/ImportError/RuntimeError when broken
        return None
    check = getattr(te, _TE_CHECKS[recipe], None)
    if check is not None:
        try:
            verdict = check(return_reason=True)
        except TypeError:  # versions without return_reason
            verdict = (bool(check()), "")
        return (bool(verdict[0]), str(verdict[1])) if isinstance(verdict, tuple) else (bool(verdict), "")
    try:
        from transformer_engine.pytorch import fp8 as te_fp8
    except Exception:  # noqa: BLE001
        return None
    old = getattr(te_fp8, _TE_CHECKS_OLD[recipe], None)
    return None if old is None else tuple(old())


def check_precision_supported(
    precision: PrecisionConfig,
    dtype_name: str,
    *,
    backend: str,
    model: Optional[ModelConfig] = None,
    parallel: Optional[ParallelConfig] = None,
    hardware: Optional[Hardware] = None,
) -> None:
    """Raise `ConfigError` naming the field (and the fix) when this machine cannot train in `precision`.

    `dtype_name` is the resolved dtype; `backend` the layer spec the model is built with ('te' or
    'local'); `hardware` defaults to `detect_hardware()`.
    """
    hardware = hardware or detect_hardware()
    if not hardware.cuda and dtype_name != "fp32":
        raise ConfigError(
            f"precision.dtype={precision.dtype} needs a GPU: on CPU Megatron's optimizer supports fp32 "
            "only; set precision.dtype=auto (fp32 here, bf16 on GPU) or fp32"
        )
    problems = fp8_support_problems(precision, hardware, backend)
    if precision.fp8 is not None and model is not None:
        problems += fp8_dimension_problems(precision, model, parallel or ParallelConfig())
    if precision.fp8 is not None and not problems:
        verdict = te_recipe_support(precision.fp8)
        if verdict is not None and not verdict[0]:
            problems.append(
                f"precision.fp8={precision.fp8}: Transformer Engine {hardware.te_version} says this "
                f"device cannot run it: {verdict[1] or 'unsupported'}"
            )
    if problems:
        raise ConfigError("; ".join(problems))


def fp8_transformer_config_kwargs(precision: PrecisionConfig) -> dict:
    """megatron-core `TransformerConfig` fields for `precision`'s FP8 settings (empty without FP8).

    `fp8` is the format ('hybrid' or 'e4m3'), `fp8_recipe` the recipe name, which megatron-core's
    `get_fp8_recipe` turns into the TE recipe object; the amax settings only matter to delayed scaling.
    """
    if precision.fp8 is None:
        return {}
    return dict(
        fp8=precision.resolved_fp8_format,
        fp8_recipe=precision.fp8,
        fp8_param=precision.fp8_param,
        fp8_amax_history_len=precision.fp8_amax_history_len,
        fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
    )
