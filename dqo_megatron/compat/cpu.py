"""Run megatron-core on a machine without CUDA: the one place where we patch it.

megatron-core assumes CUDA in a handful of modules (receive buffers on `torch.cuda.current_device()`,
`device="cuda"` literals in the schedules and the optimizer, the CUDA RNG tracker, `.cuda()` on a
rotary-embedding index, ...). Where Megatron offers an extension point we use it instead (the layer
spec's core attention and norms live in `dqo_megatron.models.local_spec`); what is left cannot be
reached through a spec, so it is patched here, and only here.

How (never touching the global `torch`):
  1. In each module of `PATCHED_MODULES`, the module-global name `torch` is rebound to `_TorchOnCpu`,
     a thin proxy that forwards everything to the real torch except that tensor factories map a CUDA
     device to the CPU (and drop `pin_memory`), and `torch.cuda` answers with the CPU: its
     `current_device()` is the CPU, `synchronize`/streams are no-ops, RNG calls use the CPU generator.
  2. A few functions whose CUDA use is a tensor method (`t.cuda()`, `t.type() == 'torch.cuda...'`) are
     replaced by device-agnostic equivalents, listed in `PATCHED_FUNCTIONS`.

`apply_cpu_patches()` is called by `dqo_megatron.parallel.initialize` and is a no-op when CUDA is
available. Every entry names the CUDA-bound code it is for (`marker`), and `tests/test_cpu_compat.py`
fails loudly when a megatron-core upgrade removes that code (the patch may no longer be needed) or
when the patched layouts stop working.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)

_CPU = torch.device("cpu")


@dataclass(frozen=True)
class PatchedModule:
    """A megatron module whose global `torch` is rebound to the CPU proxy."""

    name: str
    """Dotted module name under `megatron.core`."""
    marker: str
    """A piece of the module's source that is CUDA-bound; the test checks it is still there."""
    needed_for: str
    """Which layouts break on CPU without the patch."""


PATCHED_MODULES: tuple[PatchedModule, ...] = (
    PatchedModule("megatron.core.pipeline_parallel.schedules", 'device="cuda"', "every schedule (token count)"),
    PatchedModule("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.current_device()", "PP"),
    PatchedModule("megatron.core.utils", 'device="cuda"', "grad norm; SP all-gather buffer"),
    PatchedModule("megatron.core.tensor_parallel.mappings", "torch.cuda.current_device()", "SP"),
    PatchedModule("megatron.core.tensor_parallel.layers", "torch.cuda.current_device()", "SP backward"),
    PatchedModule("megatron.core.tensor_parallel.random", "torch.cuda.manual_seed", "RNG tracker (SP)"),
    PatchedModule("megatron.core.distributed.param_and_grad_buffer", "torch.cuda.current_device()", "Megatron DDP"),
    PatchedModule("megatron.core.optimizer.clip_grads", "device='cuda'", "grad norm / clipping"),
    PatchedModule("megatron.core.optimizer.optimizer", "device='cuda'", "FP32Optimizer"),
    PatchedModule(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "torch.cuda.current_device()",
        "RoPE",
    ),
    PatchedModule(
        "megatron.core.dist_checkpointing.strategies.filesystem_async",
        "torch.cuda.synchronize()",
        "checkpoint save",
    ),
    PatchedModule("megatron.core.dist_checkpointing.strategies.state_dict_saver", "device='cuda'", "checkpoint save"),
)


# --------------------------------------------------------------------------------------- the proxy
def _cpu_device(device: Any) -> Any:
    """Map any CUDA device spec (str, int, torch.device) to the CPU; leave others alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _on_cpu(factory: Callable) -> Callable:
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs an accelerator
        return factory(*args, **kwargs)

    wrapped.__name__ = getattr(factory, "__name__", "factory")
    wrapped.__doc__ = f"CPU-mapped `torch.{wrapped.__name__}` (dqo_megatron.compat.cpu)."
    return wrapped


class _NullStream:
    def wait_stream(self, *_args, **_kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _CudaOnCpu:
    """Stands in for `torch.cuda` inside the patched modules."""

    def current_device(self) -> torch.device:
        return _CPU

    def synchronize(self, *_args, **_kwargs) -> None:
        pass

    def current_stream(self, *_args, **_kwargs) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    def stream(self, *_args, **_kwargs):
        return contextlib.nullcontext()

    def empty_cache(self) -> None:
        pass

    def get_rng_state(self, *_args, **_kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, *_args, **_kwargs) -> None:
        torch.set_rng_state(state)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_strided",
    "as_tensor",
)


class _TorchOnCpu(types.ModuleType):
    """Stands in for the module `torch` inside the patched modules (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch", "CPU proxy for torch used by dqo_megatron.compat.cpu")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()


# ---------------------------------------------------------------------- function-level replacements
def _get_pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """Megatron's load-balanced CP slice of the RoPE table (chunks r and 2*cp-1-r), on pos_emb's device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's in-place gradient clipping without its `torch.cuda.FloatTensor` type assertion."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _get_rng_state(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _wrap_setup_embeddings(original: Callable) -> Callable:
    """Tied embeddings under PP: Megatron all-reduces a copy of the embedding made with `.cuda()`."""

    def setup_embeddings_and_output_layer(self) -> None:
        # Run Megatron's own setup with the embedding-group all-reduce masked, then do that
        # all-reduce on the tensor's own device.
        in_group = self._is_in_embd_group()
        self._is_in_embd_group = lambda: False
        try:
            original(self)
        finally:
            del self._is_in_embd_group
        if in_group and torch.distributed.is_initialized():
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)

    setup_embeddings_and_output_layer.__wrapped__ = original
    return setup_embeddings_and_output_layer


@dataclass(frozen=True)
class PatchedFunction:
    """A megatron attribute replaced by a device-agnostic equivalent."""

    owner: str
    """Module (or `module:Class`) holding the attribute."""
    attribute: str
    """The replaced name."""
    marker: str
    """CUDA-bound source of the original; the test checks it is still there."""
    make: Callable[[Any], Any]
    """Given the original attribute, return the replacement."""


PATCHED_FUNCTIONS: tuple[PatchedFunction, ...] = (
    PatchedFunction(
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "get_pos_emb_on_this_cp_rank",
        ".cuda(non_blocking=True)",
        lambda _orig: _get_pos_emb_on_this_cp_rank,
    ),
    PatchedFunction(
        "megatron.core.optimizer.optimizer",
        "clip_grad_by_total_norm_fp32",
        "torch.cuda.FloatTensor",
        lambda _orig: _clip_grad_by_total_norm_fp32,
    ),
    PatchedFunction(
        "megatron.core.tensor_parallel.random", "_get_cuda_rng_state", "torch.cuda", lambda _o: _get_rng_state
    ),
    PatchedFunction(
        "megatron.core.tensor_parallel.random", "_set_cuda_rng_state", "_lazy_call", lambda _o: _set_rng_state
    ),
    PatchedFunction(
        "megatron.core.models.common.language_module.language_module:LanguageModule",
        "setup_embeddings_and_output_layer",
        "weight.data.cuda()",
        _wrap_setup_embeddings,
    ),
)


def resolve_owner(owner: str) -> Any:
    """Import `module` or `module:Class` and return it."""
    module_name, _, class_name = owner.partition(":")
    obj = importlib.import_module(module_name)
    return getattr(obj, class_name) if class_name else obj


def original_source_of(patch: PatchedFunction) -> str:
    """Source of the original (unpatched) attribute, or, for a module-level function, of the module
    that defines it (the CUDA-bound line may sit in a helper it calls)."""
    import inspect

    current = getattr(resolve_owner(patch.owner), patch.attribute)
    original = _ORIGINALS.get((patch.owner, patch.attribute), current)
    original = getattr(original, "__wrapped__", original)
    return inspect.getsource(inspect.getmodule(original))


_ORIGINALS: dict[tuple[str, str], Any] = {}
_APPLIED = False


def cpu_patches_applied() -> bool:
    """Whether `apply_cpu_patches` has patched megatron in this process."""
    return _APPLIED


def apply_cpu_patches(force: bool = False) -> bool:
    """Patch the listed megatron modules so they run without CUDA.

    A no-op (returns False) when CUDA is available, unless `force`; idempotent. Returns True when the
    patches are (now) in place. Never modifies the global `torch` module.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for entry in PATCHED_MODULES:
        module = importlib.import_module(entry.name)
        if module.__dict__.get("torch") is not torch:
            raise RuntimeError(
                f"dqo_megatron.compat.cpu: {entry.name} no longer binds `torch` at module level; "
                "megatron-core changed, revisit PATCHED_MODULES"
            )
        module.torch = _TORCH_ON_CPU
    for patch in PATCHED_FUNCTIONS:
        owner = resolve_owner(patch.owner)
        original = getattr(owner, patch.attribute)
        _ORIGINALS[(patch.owner, patch.attribute)] = original
        setattr(owner, patch.attribute, patch.make(original))
    _APPLIED = True
    logger.info(
        "CUDA not available: patched %d megatron-core modules and %d functions for CPU (dqo_megatron.compat.cpu)",
        len(PATCHED_MODULES),
        len(PATCHED_FUNCTIONS),
    )
    return True
