"""megatron-core internals that moved between releases, one version-aware accessor each (issue #20).

Code that needs one of these internals asks here; the one exception is `checkpoint_integrity` (a leaf
below compat in the import stack), which imports `TorchCommonSaveStrategy` only where it exists.
Each accessor names what changed; `tests/test_megatron_api.py` fails when an upgrade moves
one again (instead of a silent fallback).

- CP batch slicing: `megatron.core.utils.get_batch_on_this_cp_rank` gained a required `is_hybrid_cp`
  in 0.19 (False with no `cu_seqlens` in the batch: the same zigzag as 0.16's).
- The save strategy: 0.19's default writes one file per rank (thread_count 1), 0.16's two; we ask
  for two on every version so a checkpoint's files are the same whichever release wrote it.
- CUDA graphs off without a warning: `TransformerConfig`'s default "full" scope warns on every config;
  the field is `cuda_graph_scope` up to 0.18 and `cuda_graph_modules` from 0.19.
- The model class: 0.19 logs "GPTModel IS DEPRECATED ... use HybridModel" on every construction.
  We keep GPTModel on every release (`gpt_model_class`): 0.19.2's HybridModel builds Transformer
  Engine's norm unconditionally (no CPU path) and renames every checkpoint key.
- The release itself: `check_megatron_version` refuses a megatron-core outside the tested range.
- The common (non-sharded) state of a checkpoint: common.pt beside the files (<= 0.18) or inside them
  (0.19, which reads both); `newer_format_problem` names the cause when an older release gets 0.19's files.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os

from dqo_megatron.config.loader import ConfigError

logger = logging.getLogger(__name__)

OLDEST_SUPPORTED = "0.16.1"
"""The oldest megatron-core this project runs on (CI's default leg, Python 3.11)."""
FIRST_UNSUPPORTED = "0.20"
"""The first release not yet tried; 0.19.2, the newest below it, is CI's second leg (Python 3.12)."""
ALLOW_UNTESTED_ENV = "DQO_ALLOW_UNTESTED_MEGATRON"
"""Set to 1 to run on a megatron-core outside the tested range anyway (a warning instead of the error)."""


class UnsupportedMegatronVersion(ConfigError):
    """The installed megatron-core is outside the range this project is tested on (every command prints
    it as its one-line error, as it does a bad setting)."""


def megatron_version() -> str:
    """The installed megatron-core's version string, e.g. "0.16.1"."""
    import megatron.core

    return megatron.core.__version__


def check_megatron_version(version: str | None = None) -> None:
    """Raise `UnsupportedMegatronVersion` unless OLDEST_SUPPORTED <= `version` < FIRST_UNSUPPORTED
    (default: the installed one); with DQO_ALLOW_UNTESTED_MEGATRON=1 log a warning instead."""
    from packaging.version import InvalidVersion, Version

    version = version or megatron_version()
    try:
        parsed = Version(version)
        release = Version(parsed.base_version)  # 0.20.0rc1 is a 0.20, and 0.19.0rc0 a 0.19
        inside = Version(OLDEST_SUPPORTED) <= release < Version(FIRST_UNSUPPORTED)
    except InvalidVersion:
        inside = False
    if inside:
        return
    message = (
        f"megatron-core {version} is outside the range dqo-megatron is tested on (>= {OLDEST_SUPPORTED}, "
        f"< {FIRST_UNSUPPORTED}; CI runs 0.16.1 on Python 3.11 and 0.19.2 on Python 3.12). Install one of "
        f"those (pip install 'megatron-core>={OLDEST_SUPPORTED},<{FIRST_UNSUPPORTED}'), or set "
        f"{ALLOW_UNTESTED_ENV}=1 to try it anyway (docs/architecture.md lists the internals that may have moved)"
    )
    if os.environ.get(ALLOW_UNTESTED_ENV) == "1":
        logger.warning("%s", message.split(". Install")[0] + f": running anyway ({ALLOW_UNTESTED_ENV}=1)")
        return
    raise UnsupportedMegatronVersion(message)


def no_cuda_graph_kwargs() -> dict:
    """`TransformerConfig` fields that leave CUDA graphs off without the "full scope is deprecated"
    warning every config otherwise prints: ``{cuda_graph_modules: []}`` (0.19) or
    ``{cuda_graph_scope: []}`` (0.16-0.18): the empty list is what "full" meant."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    return {"cuda_graph_modules": []} if "cuda_graph_modules" in fields else {"cuda_graph_scope": []}


@functools.lru_cache(maxsize=1)
def _cp_slicer_takes_is_hybrid_cp() -> bool:
    from megatron.core.utils import get_batch_on_this_cp_rank

    return "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def get_batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """Megatron's load-balanced CP slice (chunks r and 2*cp-1-r): 0.16 `(batch, cp_group)`; 0.19 adds a
    required `is_hybrid_cp` (False + no `cu_seqlens` in the batch = the same per-sequence zigzag)."""
    from megatron.core.utils import get_batch_on_this_cp_rank as slicer

    if _cp_slicer_takes_is_hybrid_cp():
        return slicer(batch, is_hybrid_cp=False, cp_group=cp_group)
    return slicer(batch, cp_group=cp_group)


def save_sharded_strategy(thread_count: int = 2):
    """torch_dist save strategy with `thread_count` files per rank on every version (0.16 defaulted to 2,
    0.19 to 1): the same file layout (``__<rank>_<i>.distcp``) whichever megatron-core wrote it."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=thread_count)


_GPT_DEPRECATION = "GPTModel IS DEPRECATED"


class _DropGPTModelDeprecation(logging.Filter):
    """Drops Megatron's per-construction GPTModel deprecation and says it once in our words instead."""

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_GPT_DEPRECATION):
            return True
        if not _DropGPTModelDeprecation.said:
            _DropGPTModelDeprecation.said = True
            logger.info(
                "megatron-core %s marks GPTModel deprecated in favour of HybridModel; dqo-megatron builds "
                "GPTModel on every supported release (HybridModel has no CPU path yet)",
                megatron_version(),
            )
        return False


@functools.lru_cache(maxsize=1)
def gpt_model_class() -> type:
    """Megatron's `GPTModel`, the class every supported release builds our families with.

    0.19 logs a deprecation (in favour of `HybridModel`) on every construction, twice per conversion and
    once per chunk; it is replaced by one line of ours per process. HybridModel is not used: 0.19.2's
    `HybridStack` always builds Transformer Engine's `TENorm` (no CPU path) and its layer pattern
    renames every checkpoint key (docs/architecture.md, "megatron-core versions")."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt import gpt_model as module

    logging.getLogger(module.__name__).addFilter(_DropGPTModelDeprecation())  # a no-op where nothing warns
    return GPTModel


# Where a torch_dist checkpoint keeps Megatron's common (non-sharded) state: <= 0.18 writes and reads it as
# common.pt beside the files; 0.19 writes it inside them as the ShardedObject "common_state" and reads both.
# So 0.16-0.18 cannot read what 0.19 writes (their reader fails on the missing common.pt, saying nothing useful).
COMMON_STATE_KEY_PREFIX = "common_state/"


def reads_common_state_in_files() -> bool:
    """Whether this megatron-core reads checkpoints whose common state is inside the torch_dist files (0.19)."""
    from megatron.core.dist_checkpointing import serialization

    return hasattr(serialization, "_legacy_common_state_exists")


def newer_format_problem(checkpoint_dir) -> str | None:
    """One line saying that `checkpoint_dir` (a torch_dist directory) was written by a newer megatron-core
    whose format this one cannot read; None when it can (or the directory is something else)."""
    from pathlib import Path

    checkpoint_dir = Path(checkpoint_dir)
    if reads_common_state_in_files() or (checkpoint_dir / "common.pt").exists():
        return None
    try:
        from torch.distributed.checkpoint import FileSystemReader

        keys = FileSystemReader(str(checkpoint_dir)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 - no readable index: not this case (the caller reports what failed)
        return None
    if not any(str(key).startswith(COMMON_STATE_KEY_PREFIX) for key in keys):
        return None
    return (
        f"{checkpoint_dir} was written by a newer megatron-core (>= 0.19: its common state is inside the "
        f"torch_dist files, no common.pt): this megatron-core {megatron_version()} cannot read it; use megatron-core "
        ">= 0.19 (Python >= 3.12) or a checkpoint written by this release"
    )
