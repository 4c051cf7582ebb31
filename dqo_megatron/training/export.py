"""Export the trained policy of a training checkpoint to Hugging Face format (single process).

A training checkpoint (`run_dir/checkpoints/step_N`) holds the whole `PolicyValueModel` (policy,
value network, optimizer, ...). The policy is read into an unsharded GPT, written as a dqo-megatron
conversion checkpoint (`model_config.yaml`, `weights/`, the base model's `hf/` side files when
`init.policy` had them), and handed to `megatron_to_hf`, which writes safetensors + config.json +
generation_config.json + the tokenizer (a sentencepiece model converted to an HF tokenizer with the same
ids), loadable by `transformers` with no custom code (and checks parity with `verify`).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from dqo_megatron.config import ConfigError, InitConfig, ParallelConfig, RunConfig

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "config.yaml"
"""What `dqo-megatron train` writes into run_dir (beside run_dir/checkpoints/)."""


def check_training_checkpoint(checkpoint: str | Path) -> Path:
    """`checkpoint` as a Path when it is a complete training checkpoint (``run_dir/checkpoints/step_N``);
    otherwise CheckpointError saying what it is instead (missing, a file, a run or checkpoint root, a
    conversion checkpoint, an unfinished save, not a checkpoint). Its files are checked at load."""
    from dqo_megatron.conversion.megatron_io import INFO_FILE, WEIGHTS_DIR
    from dqo_megatron.training.checkpointing import (
        _TMP_PREFIX,
        COMPLETE_MARKER,
        EXTRA_STATE_FILE,
        CheckpointError,
        list_checkpoints,
    )

    path = Path(checkpoint)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a training checkpoint (a file; name a run_dir/checkpoints/step_XXXXXXXX directory)"
        )
    inside = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
    if inside:
        raise CheckpointError(
            f"{path} is a run directory or checkpoint root, not one checkpoint: name one of its "
            f"step_* directories (the newest: {inside[-1][1]})"
        )
    if (path / INFO_FILE).is_file() and (path / WEIGHTS_DIR).is_dir():
        raise CheckpointError(
            f"{path} is a dqo-megatron conversion checkpoint, not a training checkpoint: "
            "`dqo-megatron convert megatron-to-hf` exports it"
        )
    if path.name.startswith(_TMP_PREFIX):
        raise CheckpointError(f"{path} is a checkpoint save that never finished (no {COMPLETE_MARKER} marker)")
    for needed in (COMPLETE_MARKER, EXTRA_STATE_FILE):
        if not (path / needed).is_file():
            raise CheckpointError(f"{path} is not a training checkpoint (no {needed})")
    return path


def export_config_path(checkpoint: str | Path, config: str | Path | None = None) -> Path:
    """The run config to export `checkpoint` with: `config` if given, else ``run_dir/config.yaml`` of the
    run_dir the checkpoint is in. The checkpoint is checked first (`check_training_checkpoint`), so that
    a wrong checkpoint path is reported as such and not as a missing config file."""
    path = check_training_checkpoint(checkpoint)
    if config is not None:
        return Path(config)
    found = path.absolute().parent.parent / RUN_CONFIG_FILE
    if not found.is_file():
        raise ConfigError(
            f"{found} does not exist: checkpoint {path} is not in the run_dir/checkpoints/ of a "
            "`dqo-megatron train` run; pass the run's config with --config"
        )
    return found


def _export_inputs(run: RunConfig, checkpoint: str | Path, tokenizer: Optional[str] = None) -> list:
    """What an export reads: the checkpoint, the base model whose hf/ files it copies, the tokenizer."""
    return [p for p in (checkpoint, run.init.policy, tokenizer) if p]


def export_tokenizer_source(run: RunConfig, tokenizer: Optional[str | Path] = None):
    """The tokenizer an HF export of `run` ships, read and checked once (`hf_tokenizer.ExportTokenizer`,
    handed to `megatron_to_hf`; ConversionError naming a wrong path): `tokenizer` (an HF tokenizer
    directory or a sentencepiece .model); else None when init.policy's hf/ holds one (the converter takes
    it from the checkpoint); else eval.tokenizer, the one the run framed prompts with."""
    from dqo_megatron.conversion.hf_tokenizer import checked_tokenizer_source
    from dqo_megatron.conversion.megatron_io import HF_DIR
    from dqo_megatron.conversion.registry import ConversionError
    from dqo_megatron.tokenizer_files import holds_tokenizer

    if tokenizer is None and not (run.init.policy and holds_tokenizer(Path(run.init.policy) / HF_DIR)):
        if run.eval.tokenizer and holds_tokenizer(run.eval.tokenizer):
            try:  # a fallback the user did not ask for: one that cannot be exported is skipped, not fatal
                return checked_tokenizer_source(run.eval.tokenizer)
            except ConversionError as exc:
                logger.warning("exporting without a tokenizer: eval.tokenizer %s", exc)
                return None
    return checked_tokenizer_source(tokenizer)


def export_policy_to_megatron(
    run: RunConfig, checkpoint: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the policy of training checkpoint `checkpoint` (of `run`) as a dqo-megatron conversion
    checkpoint `out` (`model_config.yaml`, `weights/`, the base model's `hf/` side files when
    `init.policy` had them): what `init.policy` / `init.reference` of a next run take, at any layout.

    Atomic (staged beside `out`, renamed at the end). Runs at TP=PP=1 in this process.
    """
    from dqo_megatron import parallel
    from dqo_megatron.conversion.megatron_io import (
        HF_DIR,
        WEIGHTS_DIR,
        CheckpointInfo,
        dtype_name,
        save_chunks,
        staged_output,
        write_metadata,
    )
    from dqo_megatron.training.checkpointing import load_checkpoint
    from dqo_megatron.training.policy_value import build_policy_value_chunks

    checkpoint = check_training_checkpoint(checkpoint)
    single = copy.deepcopy(run)
    single.parallel = ParallelConfig()
    single.init = InitConfig()
    parallel.initialize(single.parallel, seed=run.train.seed)
    (chunk,) = build_policy_value_chunks(single, with_value=False, with_reference=False)
    load_checkpoint(checkpoint, [chunk], restore_rng=False, verify=run.train.verify_checkpoints)  # damage: named
    with staged_output(out, overwrite, _export_inputs(run, checkpoint)) as staging:
        save_chunks([chunk.policy], staging / WEIGHTS_DIR)
        param_dtype = next(chunk.policy.parameters()).dtype
        write_metadata(
            staging,
            run.model,
            CheckpointInfo(family=run.model.family, dtype=dtype_name(param_dtype), source=str(checkpoint.absolute())),
        )
        base_hf = Path(run.init.policy) / HF_DIR if run.init.policy else None
        if base_hf is not None and base_hf.is_dir():
            shutil.copytree(base_hf, staging / HF_DIR)
        else:
            (staging / HF_DIR).mkdir()
    return Path(out)


def export_policy_to_hf(
    run: RunConfig,
    checkpoint: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    tokenizer: Optional[str] = None,
    verify: bool = False,
):
    """Write the policy of training checkpoint `checkpoint` (of `run`) as an HF model directory `out`, with
    its tokenizer (`export_tokenizer_source`) and generation_config.json.

    Returns the conversion report. Runs at TP=PP=1 in this process whatever layout trained it.
    """
    from dqo_megatron.conversion.convert import megatron_to_hf
    from dqo_megatron.conversion.megatron_io import check_output

    out = Path(out)
    check_training_checkpoint(checkpoint)  # a wrong checkpoint path is the first thing to report
    shipped = export_tokenizer_source(run, tokenizer)  # read and checked before the checkpoint loads
    check_output(out.absolute(), overwrite, _export_inputs(run, checkpoint, shipped.path if shipped else None))
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out.absolute().parent))
    try:
        export_policy_to_megatron(run, checkpoint, staging / "megatron")
        return megatron_to_hf(
            staging / "megatron",
            out,
            overwrite=overwrite,
            dtype=dtype,
            tokenizer=shipped,
            verify=verify,
            progress=False,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
