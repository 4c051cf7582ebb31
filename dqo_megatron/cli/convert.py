"""`convert` commands: `hf-to-megatron`, `megatron-to-hf` (thin: parse, call dqo_megatron.conversion)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dqo_megatron.cli._app import GuardedTyper, app, configure_logging, dtype_option

convert_app = GuardedTyper(
    help="Convert checkpoints between Hugging Face and Megatron (see docs/checkpoints.md).", no_args_is_help=True
)
app.add_typer(convert_app, name="convert")


def _setup_logging() -> None:
    configure_logging()


def _run(fn, *args, **kwargs) -> None:
    from dqo_megatron.conversion import ConversionError

    _setup_logging()
    try:
        report = fn(*args, **kwargs)
    except ConversionError as exc:
        typer.echo(f"conversion failed: {exc}", err=True)
        raise typer.Exit(2) from None
    if report.parity is not None:
        typer.echo(report.parity.summary())
    model = report.model
    typer.echo(
        f"wrote {report.output} ({model.family}, {report.dtype}; seq_length={model.seq_length}, "
        f"make_vocab_size_divisible_by={model.make_vocab_size_divisible_by}) in {report.seconds:.1f} s"
    )


@convert_app.command("hf-to-megatron")
def hf_to_megatron(
    src: Path = typer.Argument(..., help="Hugging Face model directory (config.json + safetensors)."),
    out: Path = typer.Argument(..., help="Output directory (dqo-megatron checkpoint)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits with transformers; fail above --tolerance."),
    tolerance: float = typer.Option(1e-3, help="Max |logit difference| accepted by --verify (fp32)."),
    dtype: str = dtype_option("the source's (stored dtype)"),
    tensor_parallel: int = typer.Option(1, "--tp", help="Check the model can be split into this TP size."),
    pipeline_parallel: int = typer.Option(1, "--pp", help="Check the model can be split into this PP size."),
    value: bool = typer.Option(False, "--value", help="Write a value network (trunk copied, scalar head zero)."),
    value_head: Optional[Path] = typer.Option(None, help="With --value: take the head from this value checkpoint."),
    make_vocab_size_divisible_by: int = typer.Option(
        128,
        "--make-vocab-size-divisible-by",
        help="model.make_vocab_size_divisible_by written to model_config.yaml (Megatron-LM's and the example "
        "configs' 128). Runs may pad differently: the weights are stored unpadded.",
    ),
    seq_length: Optional[int] = typer.Option(
        None,
        "--seq-length",
        help="model.seq_length written to model_config.yaml (default: config.json's max_position_embeddings; "
        "at most that). Runs may use a shorter one.",
    ),
) -> None:
    """HF safetensors -> Megatron distributed checkpoint (loads under any TP/PP)."""
    from dqo_megatron.config import ConfigError, ParallelConfig
    from dqo_megatron.conversion import hf_to_megatron as convert

    try:
        layout = ParallelConfig(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
        )
    except ConfigError as exc:
        typer.echo(f"conversion failed: {exc}", err=True)
        raise typer.Exit(2) from None
    common = dict(overwrite=overwrite, dtype=dtype, verify=verify, tolerance=tolerance)
    padding = dict(make_vocab_size_divisible_by=make_vocab_size_divisible_by, seq_length=seq_length)
    _run(convert, src, out, **common, layouts=[layout], value=value, value_head=value_head, **padding)


@convert_app.command("megatron-to-hf")
def megatron_to_hf(
    src: Path = typer.Argument(..., help="dqo-megatron checkpoint directory."),
    out: Path = typer.Argument(..., help="Output Hugging Face model directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    verify: bool = typer.Option(False, "--verify", help="Compare logits of the written model; fail above --tolerance."),
    tolerance: float = typer.Option(1e-3, help="Max |logit difference| accepted by --verify (fp32)."),
    dtype: str = dtype_option("the checkpoint's (written dtype)"),
    tokenizer: Optional[Path] = typer.Option(
        None,
        help="An HF tokenizer directory (copied) or a sentencepiece .model (written as an HF tokenizer with the "
        "training ids); default: the checkpoint's hf/.",
    ),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors file, e.g. 5GB, 500MB."),
) -> None:
    """Megatron distributed checkpoint -> HF safetensors + config.json + tokenizer (plain transformers)."""
    from dqo_megatron.conversion import megatron_to_hf as convert

    common = dict(overwrite=overwrite, dtype=dtype, verify=verify, tolerance=tolerance)
    _run(convert, src, out, **common, tokenizer=tokenizer, max_shard_size=max_shard_size)


@convert_app.command("value-from-megatron")
def value_from_megatron(
    src: Path = typer.Argument(..., help="dqo-megatron policy checkpoint directory."),
    out: Path = typer.Argument(..., help="Output value checkpoint directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    value_head: Optional[Path] = typer.Option(None, help="Take the head from this value checkpoint (default: zeros)."),
) -> None:
    """Megatron policy checkpoint -> value-network checkpoint (trunk copied, scalar head zero-initialized)."""
    from dqo_megatron.conversion import ConversionError
    from dqo_megatron.conversion.value import value_from_megatron as convert

    _setup_logging()
    try:
        seconds = convert(src, out, overwrite=overwrite, value_head=value_head)
    except ConversionError as exc:
        typer.echo(f"conversion failed: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote value checkpoint {out} in {seconds:.1f} s")
