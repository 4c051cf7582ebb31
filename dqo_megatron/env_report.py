"""Versions of the stack, for `dqo-megatron version`, logs and benchmark write-ups."""

from __future__ import annotations

import importlib.metadata
import platform


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> dict[str, str]:
    """Return ``{component: version}`` for dqo-megatron, Python, torch, megatron-core, TE, apex, CUDA."""
    import torch

    from dqo_megatron import __version__

    report = {
        "dqo-megatron": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron-core": _dist_version("megatron-core"),
        "transformer-engine": _dist_version("transformer-engine"),
        # NVIDIA apex is installed from source in NVIDIA's container; the PyPI "apex" is unrelated.
        "nvidia-apex": "present" if _importable("apex.normalization") else "absent",
        "cuda": torch.version.cuda or "none (CPU build)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    return report


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # noqa: BLE001 - any import failure means "absent" (TE/apex raise OSError etc.)
        return False
