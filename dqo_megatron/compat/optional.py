"""Optional GPU libraries: NVIDIA Transformer Engine and NVIDIA apex.

Both ship in NVIDIA's PyTorch container and are absent on CPU machines (TE cannot even be imported
there: its CUDA libraries are missing). They are imported lazily and only ever optionally; the PyPI
package called `apex` is an unrelated web toolkit and is never a dependency.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def transformer_engine_status() -> tuple[bool, str]:
    """Return ``(usable, reason)``: whether the Transformer Engine layer spec can be used here."""
    if not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - TE raises OSError/ImportError/RuntimeError when broken
        return False, f"transformer_engine cannot be imported ({type(exc).__name__}: {exc})"
    return True, f"transformer_engine {getattr(transformer_engine, '__version__', '?')}"


@functools.lru_cache(maxsize=1)
def apex_available() -> bool:
    """Whether NVIDIA apex (with its fused normalization kernels) is importable."""
    try:
        import apex.normalization  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True
