"""`dqo-megatron train`: DQO or a baseline on a preprocessed dataset (single process or torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dqo_megatron.cli._app import app, configure_logging, dtype_option


@app.command()
def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides, e.g. algorithm=dro train.lr=1e-6"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (see examples/configs/)."),
    resume: Optional[str] = typer.Option(
        None, help="auto (default: newest checkpoint in run_dir), none, or a checkpoint directory."
    ),
) -> None:
    """Train `algorithm` (dqo, dro, dpo, kto, sft, rs, or one registered in dqo_megatron.algorithms) on
    `data.train_prefix`; writes run_dir/{config.yaml,checkpoints,tensorboard}.

    Several processes: `torchrun --nproc-per-node 8 -m dqo_megatron train -c examples/configs/qwen2-7b-gsm8k-dqo.yaml`.
    """
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.eval.during_training import HeldOutEvaluator
    from dqo_megatron.parallel import destroy
    from dqo_megatron.training.trainer import train as run_training

    configure_logging()
    try:
        run = load_config(RunConfig, config, list(overrides or []) + ([f"train.resume={resume}"] if resume else []))
        summary = run_training(run, make_evaluator=HeldOutEvaluator)
    except (ConfigError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        last = f"{summary.losses[-1]:.4f}" if summary.losses else "n/a"
        typer.echo(
            f"train {summary.stopped_by}: step {summary.steps} (started at {summary.start_step}), last loss {last}, "
            f"skipped non-finite steps {summary.skipped_nonfinite}"
        )
    destroy()


@app.command()
def annotate(
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides, e.g. data.train_prefix=data/train"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config (the same as for train)."),
) -> None:
    """Run the frozen reference (init.reference, else init.policy) over data.train_prefix once and store
    its per-token log-probs in the dataset, so training needs no reference model (data.reference=data)."""
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.parallel import destroy
    from dqo_megatron.training.annotate import annotate as run_annotate

    configure_logging()
    try:
        run = load_config(RunConfig, config, list(overrides or []))
        counts = run_annotate(run)
    except (ConfigError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        typer.echo(f"annotate done: {counts['documents']} documents in {counts['seconds']:.1f} s")
    destroy()


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A training checkpoint: run_dir/checkpoints/step_XXXXXXXX."),
    out: Path = typer.Argument(
        ..., help="Output directory (HF model, or a dqo-megatron checkpoint with --format megatron)."
    ),
    fmt: str = typer.Option(
        "hf",
        "--format",
        help="hf: safetensors + config.json + tokenizer; megatron: a checkpoint "
        "that init.policy / init.reference of another run take (like `convert hf-to-megatron`).",
    ),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="The run's config (default: run_dir/config.yaml beside the checkpoints)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output directory."),
    dtype: str = dtype_option("the checkpoint's"),
    tokenizer: Optional[str] = typer.Option(
        None,
        help="An HF tokenizer directory (copied) or a sentencepiece .model (written as an HF tokenizer with the "
        "same ids); default: the init checkpoint's hf/, else eval.tokenizer.",
    ),
    verify: bool = typer.Option(False, help="Compare logits of the written HF model with the checkpoint."),
) -> None:
    """Export the trained policy of a training checkpoint to Hugging Face format (or to a Megatron checkpoint)."""
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.parallel import destroy
    from dqo_megatron.training.export import export_config_path, export_policy_to_hf, export_policy_to_megatron

    configure_logging()
    try:
        if fmt not in ("hf", "megatron"):
            raise ValueError(f"--format {fmt!r}: choose hf or megatron")
        if fmt == "megatron" and verify:
            raise ValueError(
                "--verify compares the written HF model with the checkpoint: it needs --format hf (a "
                "Megatron export is the checkpoint's own weights, loaded back by the next run)"
            )
        config = export_config_path(checkpoint, config)  # a wrong checkpoint path is named as such
        run = load_config(RunConfig, config)
        if fmt == "megatron":
            written = export_policy_to_megatron(run, checkpoint, out, overwrite=overwrite)
        else:
            written = export_policy_to_hf(
                run, checkpoint, out, overwrite=overwrite, dtype=dtype, tokenizer=tokenizer, verify=verify
            ).output
    except (ConfigError, ConversionError, FileNotFoundError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"exported {checkpoint} -> {written}")
    destroy()
