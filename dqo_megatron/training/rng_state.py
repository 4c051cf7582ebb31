"""This process's random number generators as a checkpointable dict (re-exported by `training.checkpointing`)."""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch


def rng_state() -> dict:
    """This process's RNG states: python, numpy (as tensors), torch CPU, CUDA (current device), and
    Megatron's model-parallel RNG tracker (the TP-region / expert / data-parallel generators)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # numpy is optional for us; nothing to save then
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state` returned (parts absent from `state` are left alone)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            s = state["numpy"]
            np.random.set_state(
                (s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached_gaussian"])
            )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def _as_tuple(obj):
    # random.setstate wants the nested tuples back exactly (torch.save keeps tuples; be safe anyway).
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj
